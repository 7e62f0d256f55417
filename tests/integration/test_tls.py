"""TLS and mutual TLS on the real services (rpc/auth.py add_port / channel_credentials), with a CA,
server and client certificates made here by the openssl command (skipped without it).

- The feedback service (its own process) with mutual TLS: a client certificate of its CA plus an
  API key logs an event; no client certificate, a certificate of another CA, or plaintext are
  refused at the handshake (UNAVAILABLE) and nothing is stored; the right certificate without a
  key is still UNAUTHENTICATED (mTLS does not replace the key).
- The gateway (in-process, the session's Triton and Feast) with TLS: Recommend over TLS with the
  recommend key answers, a plaintext client cannot; its LogServed / GetBlendWeights reach that
  mTLS feedback service over TLS with the gateway's own client certificate.

"Was not stored" is read through the service: the event log is idempotent on event_id, so the
same event sent afterwards by an accepted client is `accepted` (new) rather than `duplicate`.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from recsys.v1 import feedback_pb2 as fb
from rpc.auth import channel_credentials
from rpc.clients import FeedbackClient, RecommendClient
from scripts.local_redis import free_port
from tests.keys import GATEWAY_KEY, SHOP_KEY
from tests.grpc_calls import status_of as _code
from tests.processes import FeedbackProcess

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")]

S = grpc.StatusCode
TIMEOUT_S = 30  # per call: generous, a loaded 2-core box may take seconds for a first handshake
HOST = "localhost"  # the name in the server certificate (it also names IP 127.0.0.1)
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # fast to make, TLS 1.2/1.3


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # signs `server` and `client`
    server: Pair  # SAN localhost, 127.0.0.1
    client: Pair  # a client certificate of `ca`
    stranger: Pair  # a client certificate of another CA


def _openssl(directory: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def _ca(directory: Path, name: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(directory, "req", "-x509", *EC_KEY, "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
             "-subj", f"/CN=recsys test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def _signed(directory: Path, name: str, ca: Pair, extensions: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(directory, "req", "-new", *EC_KEY, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(directory, "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-set_serial", "0x" + secrets.token_hex(8), "-days", "2", "-out", str(pair.cert), "-extfile", str(ext))
    return pair


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate and a client certificate it signs, and a client certificate of
    another CA (valid for 2 days: a test run never outlives them, a clock skew of a day is fine)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other_ca = _ca(directory, "ca"), _ca(directory, "other-ca")
    return Certs(
        ca=ca.cert,
        server=_signed(directory, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                                "extendedKeyUsage=serverAuth\n"),
        client=_signed(directory, "client", ca, "extendedKeyUsage=clientAuth\n"),
        stranger=_signed(directory, "stranger", other_ca, "extendedKeyUsage=clientAuth\n"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mtls_feedback(certs, tmp_path_factory):
    """The feedback service whose port is mutual TLS (client certificates of `certs.ca` only)."""
    metrics_port = free_port()
    service = FeedbackProcess(tmp_path_factory.mktemp("tls_events"), {
        "RECSYS_FEEDBACK_TLS_CERT_FILE": str(certs.server.cert), "RECSYS_FEEDBACK_TLS_KEY_FILE": str(certs.server.key),
        "RECSYS_FEEDBACK_TLS_CLIENT_CA_FILE": str(certs.ca), "RECSYS_FEEDBACK_METRICS_PORT": str(metrics_port)}).start()
    service.metrics_port = metrics_port
    yield service
    service.stop()


def _client_credentials(certs: Certs, client: Pair | None = None) -> grpc.ChannelCredentials:
    return channel_credentials(certs.ca, client.cert if client else None, client.key if client else None)


def _event(name: str) -> fb.Event:
    return fb.Event(event_id=f"tls-{name}-{time.time_ns()}", type=fb.EVENT_TYPE_CLICK, user_id="u1", item_id="i1",
                    request_id="r1", position=1)


def _log_as_trusted(service: FeedbackProcess, certs: Certs, event: fb.Event) -> fb.LogResponse:
    with FeedbackClient(f"{HOST}:{service.port}", TIMEOUT_S, api_key=SHOP_KEY,
                        credentials=_client_credentials(certs, certs.client)) as trusted:
        return trusted.log([event])


def test_mutual_tls_accepts_a_client_certificate_of_its_ca(mtls_feedback, certs):
    event = _event("trusted")
    reply = _log_as_trusted(mtls_feedback, certs, event)
    assert (reply.accepted, reply.rejected) == (1, 0), reply
    again = _log_as_trusted(mtls_feedback, certs, event)
    assert (again.accepted, again.duplicate) == (0, 1), again  # it was stored (what the refusals below rely on)


@pytest.mark.parametrize("caller", ["no client certificate", "another CA's certificate", "plaintext"])
def test_mutual_tls_refuses_at_the_handshake_and_stores_nothing(mtls_feedback, certs, caller):
    credentials = {"no client certificate": _client_credentials(certs),
                   "another CA's certificate": _client_credentials(certs, certs.stranger),
                   "plaintext": None}[caller]
    event = _event("refused")
    with FeedbackClient(f"{HOST}:{mtls_feedback.port}", TIMEOUT_S, api_key=SHOP_KEY, credentials=credentials) as client:
        code, details = _code(lambda: client.log([event]))
    # grpc reports a failed handshake as a connection that could not be made ("failed to connect
    # to all addresses; ... Socket closed" with grpc 1.85): never a status from the service.
    assert code == S.UNAVAILABLE, (caller, code, details)
    reply = _log_as_trusted(mtls_feedback, certs, event)
    assert (reply.accepted, reply.duplicate) == (1, 0), (caller, reply)  # the refused call stored nothing


def test_mutual_tls_does_not_replace_the_api_key(mtls_feedback, certs):
    event = _event("no-key")
    with FeedbackClient(f"{HOST}:{mtls_feedback.port}", TIMEOUT_S, api_key="",
                        credentials=_client_credentials(certs, certs.client)) as keyless:
        code, details = _code(lambda: keyless.log([event]))
    assert code == S.UNAUTHENTICATED and "authorization: Bearer <key>" in details, (code, details)
    reply = _log_as_trusted(mtls_feedback, certs, event)
    assert (reply.accepted, reply.duplicate) == (1, 0), reply


# --- the gateway -------------------------------------------------------------------------------------

def _metric(port: int, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(want + " "))


@pytest.fixture(scope="module")
def tls_gateway(feature_repo, triton_gw, tmp_path_factory, mtls_feedback, certs):
    """The gateway serving TLS, its channel to the mTLS feedback service made with the CA and its
    own client certificate (feedback_tls_*)."""
    from cli.background import BackgroundGateway
    from gateway.config import GatewaySettings

    settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=triton_gw.grpc_url,
                               embedding_cache_dir=tmp_path_factory.getbasetemp() / "embeddings",
                               request_timeout_ms=10_000, embed_timeout_ms=5_000, feature_timeout_ms=2_000,
                               interest_timeout_ms=2_000, rank_timeout_ms=5_000,
                               tls_cert_file=certs.server.cert, tls_key_file=certs.server.key,
                               feedback_url=f"{HOST}:{mtls_feedback.port}", feedback_api_key=GATEWAY_KEY,
                               feedback_tls_ca_file=certs.ca, feedback_tls_cert_file=certs.client.cert,
                               feedback_tls_key_file=certs.client.key, online_weights_poll_s=0.2)
    with BackgroundGateway(settings) as gw:
        yield gw


def test_the_gateway_answers_over_tls_and_refuses_plaintext(tls_gateway, certs):
    address = f"{HOST}:{tls_gateway.port}"
    with RecommendClient(address, TIMEOUT_S, api_key=SHOP_KEY, credentials=_client_credentials(certs)) as tls:
        assert len(tls.recommend("rain jacket", num_results=3).items) == 3
    with RecommendClient(address, TIMEOUT_S, api_key=SHOP_KEY) as plain:
        code, details = _code(lambda: plain.recommend("rain jacket", num_results=3))
    assert code == S.UNAVAILABLE, (code, details)  # a plaintext client cannot talk to a TLS port


def test_the_gateway_logs_served_lists_to_an_mtls_feedback_service(tls_gateway, mtls_feedback, certs):
    # Every LogServed / GetBlendWeights the feedback service answers OK came over mutual TLS (its
    # only port) with the gateway's internal key: nothing else in this module calls them.
    port = mtls_feedback.metrics_port
    before = _metric(port, "recsys_feedback_requests_total", method="LogServed", code="OK")
    with RecommendClient(f"{HOST}:{tls_gateway.port}", TIMEOUT_S, api_key=SHOP_KEY,
                         credentials=_client_credentials(certs)) as shop:
        shop.recommend("running shoes", user_id="u00001", num_results=5)
    deadline = time.monotonic() + 60
    while _metric(port, "recsys_feedback_requests_total", method="LogServed", code="OK") <= before:
        assert time.monotonic() < deadline, "no LogServed from the gateway reached the mTLS feedback service"
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while _metric(port, "recsys_feedback_requests_total", method="GetBlendWeights", code="OK") == 0:
        assert time.monotonic() < deadline, "the gateway never read the blend weights over mTLS"
        time.sleep(0.2)
