"""Auth on the real services (rpc/auth.py): the gateway in-process (real Triton, real Feast) and the
feedback service as its own process, both reading one key file. No key: UNAUTHENTICATED naming
what to send; a key without the method's role: PERMISSION_DENIED; health open; the gateway logs
served lists with its own internal key; editing the key file (revoke, add) takes effect without a
restart; hostile authorization metadata is UNAUTHENTICATED, never INTERNAL/UNKNOWN; TLS with a
self-signed certificate made here by the openssl command (skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc
from rpc.auth import ADMIN, EVENTS, RECOMMEND, key_line, new_key
from rpc.clients import FeedbackClient, RecommendClient, channel
from scripts.local_redis import free_port
from tests.keys import GATEWAY_KEY, SHOP_KEY
from tests.grpc_calls import status_of as _code
from tests.processes import FeedbackProcess

pytestmark = pytest.mark.integration

S = grpc.StatusCode
RELOAD_S = 2.5  # the key file is re-read at most once a second: a change is seen within ~1 s


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "keys"
    path.write_text(f"# the file's own keys (RECSYS_AUTH_KEYS holds the test session's)\n"
                    f"{key_line('file-admin', [ADMIN], FILE_ADMIN_KEY)}\n")
    path.chmod(0o600)
    return path


FILE_ADMIN_KEY = new_key()


@pytest.fixture(scope="module")
def feedback(key_file, tmp_path_factory):
    metrics_port = free_port()
    service = FeedbackProcess(tmp_path_factory.mktemp("auth_events"), {
        "RECSYS_AUTH_KEYS_FILE": str(key_file), "RECSYS_FEEDBACK_METRICS_PORT": str(metrics_port)}).start()
    service.metrics_port = metrics_port
    yield service
    service.stop()


@pytest.fixture(scope="module")
def gateway(feature_repo, triton_gw, tmp_path_factory, feedback, key_file):
    from cli.background import BackgroundGateway
    from gateway.config import GatewaySettings

    settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=triton_gw.grpc_url,
                               embedding_cache_dir=tmp_path_factory.getbasetemp() / "embeddings",
                               request_timeout_ms=10_000, embed_timeout_ms=5_000, feature_timeout_ms=2_000,
                               interest_timeout_ms=2_000, rank_timeout_ms=5_000,
                               feedback_url=f"127.0.0.1:{feedback.port}", feedback_api_key=GATEWAY_KEY,
                               online_weights_poll_s=0.2, auth_keys_file=key_file)
    with BackgroundGateway(settings) as gw:
        yield gw


def _event(n: int) -> fb.Event:
    return fb.Event(event_id=f"auth-e{n}-{time.time_ns()}", type=fb.EVENT_TYPE_CLICK, user_id="u1", item_id="i1",
                    request_id="r1", position=1)


def test_no_key_wrong_role_right_role_and_open_health(gateway, feedback):
    fb_address = f"127.0.0.1:{feedback.port}"
    with RecommendClient(gateway.address, 30, api_key="") as anonymous:
        code, details = _code(lambda: anonymous.recommend("rain jacket"))
        assert code == S.UNAUTHENTICATED and "authorization: Bearer <key>" in details, details
    with FeedbackClient(fb_address, 10, api_key="") as anonymous:
        code, details = _code(lambda: anonymous.log([_event(0)]))
        assert code == S.UNAUTHENTICATED and "authorization: Bearer <key>" in details, details
    with FeedbackClient(fb_address, 10, api_key=SHOP_KEY) as shop:
        assert shop.log([_event(1)]).accepted == 1
        served = fb.ServedList(request_id="r1", items=[fb.ServedItem(item_id="i1", parts=[1, 0, 0, 0])])
        code, details = _code(lambda: shop.log_served([served]))
        assert code == S.PERMISSION_DENIED and "needs role 'internal'" in details, details
        code, _ = _code(lambda: shop.get_blend_weights())
        assert code == S.PERMISSION_DENIED
    with RecommendClient(gateway.address, 30, api_key=SHOP_KEY) as shop:
        assert len(shop.recommend("rain jacket", num_results=3).items) == 3
    for address in (gateway.address, fb_address):
        with grpc.insecure_channel(address) as bare:  # no key at all
            status = health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def _metric(port: int, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(want + " "))


def test_the_gateway_logs_served_lists_with_its_internal_key(gateway, feedback):
    before = _metric(feedback.metrics_port, "recsys_feedback_requests_total", method="LogServed", code="OK")
    denied = _metric(feedback.metrics_port, "recsys_feedback_requests_total", method="LogServed", code="PERMISSION_DENIED")
    with RecommendClient(gateway.address, 30, api_key=SHOP_KEY) as shop:
        shop.recommend("running shoes", user_id="u00001", num_results=5)
    deadline = time.monotonic() + 10
    while _metric(feedback.metrics_port, "recsys_feedback_requests_total", method="LogServed", code="OK") <= before:
        assert time.monotonic() < deadline, "no LogServed OK from the gateway"
        time.sleep(0.1)
    assert _metric(feedback.metrics_port, "recsys_feedback_requests_total", method="GetBlendWeights", code="OK") > 0
    assert _metric(feedback.metrics_port, "recsys_feedback_requests_total", method="LogServed",
                   code="PERMISSION_DENIED") == denied  # none of the gateway's was refused


def _until(predicate, what: str, timeout_s: float = RELOAD_S) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_rotating_the_key_file_takes_effect_without_a_restart(gateway, feedback, key_file):
    old, new = new_key(), new_key()
    original = key_file.read_text()
    key_file.write_text(original + key_line("rotating", [RECOMMEND, EVENTS], old) + "\n")
    fb_address = f"127.0.0.1:{feedback.port}"
    try:
        with RecommendClient(gateway.address, 30, api_key=old) as gw_old, \
                FeedbackClient(fb_address, 10, api_key=old) as fb_old, \
                RecommendClient(gateway.address, 30, api_key=new) as gw_new, \
                FeedbackClient(fb_address, 10, api_key=new) as fb_new:
            _until(lambda: _code(lambda: gw_old.recommend("rain jacket", num_results=1))[0] == S.OK, "gateway: key added")
            _until(lambda: _code(lambda: fb_old.log([_event(2)]))[0] == S.OK, "feedback: key added")
            # Revoke the old key, add the new one: one edit of the file, no restart.
            key_file.write_text(original + key_line("rotating", [RECOMMEND, EVENTS], new) + "\n")
            _until(lambda: _code(lambda: gw_old.recommend("rain jacket", num_results=1))[0] == S.UNAUTHENTICATED,
                   "gateway: old key revoked")
            _until(lambda: _code(lambda: fb_old.log([_event(3)]))[0] == S.UNAUTHENTICATED, "feedback: old key revoked")
            assert _code(lambda: gw_new.recommend("rain jacket", num_results=1))[0] == S.OK
            assert _code(lambda: fb_new.log([_event(4)]))[0] == S.OK
            # A file that does not parse keeps the last good keys.
            key_file.write_text(original + "rotating recommend not-a-hash\n")
            time.sleep(RELOAD_S)
            assert _code(lambda: fb_new.log([_event(5)]))[0] == S.OK
    finally:
        key_file.write_text(original)


HOSTILE = {
    "empty": [("authorization", "")],
    "bearer without a key": [("authorization", "Bearer ")],
    "wrong scheme": [("authorization", "Basic dXNlcjpwYXNz")],
    "lower-case scheme": [("authorization", "bearer " + SHOP_KEY)],
    "huge": [("authorization", "Bearer " + "k" * 6000)],
    "non-ASCII": [("authorization", "Bearer clé-ключ-鍵")],
    "control characters": [("authorization", "Bearer \x01\x02")],
    "binary header": [("authorization-bin", b"\xff\x00Bearer " + SHOP_KEY.encode())],
    "unknown key first": [("authorization", "Bearer rk_nope"), ("authorization", "Bearer " + SHOP_KEY)],
    "key prefix": [("authorization", "Bearer " + SHOP_KEY[:-1])],
}


CLIENT_REFUSES = ("non-ASCII", "control characters")  # not legal in an HTTP/2 header value


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_authorization_metadata_is_unauthenticated(gateway, feedback, case):
    calls = (
        (gateway.address, lambda ch: recommend_pb2_grpc.RecommendServiceStub(ch).Recommend,
         recommend_pb2.RecommendRequest(query="rain jacket")),
        (f"127.0.0.1:{feedback.port}", lambda ch: feedback_pb2_grpc.FeedbackServiceStub(ch).Log,
         fb.LogRequest(events=[_event(6)])),
    )
    for address, method, request in calls:
        with grpc.insecure_channel(address) as bare:
            try:
                method(bare)(request, metadata=HOSTILE[case], timeout=10)
            except ValueError as e:  # grpc's client refuses to send it at all: nothing reached the server
                assert "metadata" in str(e).lower(), e
                continue
            except grpc.RpcError as e:
                if e.code() == S.INTERNAL and e.details() == "Invalid metadata" and case in CLIENT_REFUSES:
                    continue  # grpc's client will not send a header value HTTP/2 forbids: nothing reached the server
                if case == "huge" and e.code() in (S.RESOURCE_EXHAUSTED, S.INTERNAL) and "header" in e.details().lower():
                    continue  # over grpc's header-size limit: refused by the transport, before the service
                assert e.code() == S.UNAUTHENTICATED, (case, address, e.code(), e.details())
            else:
                raise AssertionError(f"{case}: {address} answered OK")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a self-signed certificate")
def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    from rpc.auth import channel_credentials

    service = FeedbackProcess(tmp_path / "events", {"RECSYS_FEEDBACK_TLS_CERT_FILE": str(cert),
                                                    "RECSYS_FEEDBACK_TLS_KEY_FILE": str(key)}).start()
    try:
        with FeedbackClient(f"localhost:{service.port}", 10, api_key=SHOP_KEY,
                            credentials=channel_credentials(cert)) as tls:
            assert tls.log([_event(7)]).accepted == 1
        plain = feedback_pb2_grpc.FeedbackServiceStub(channel(f"localhost:{service.port}", api_key=SHOP_KEY))
        code, _ = _code(lambda: plain.Log(fb.LogRequest(events=[_event(8)]), timeout=5))
        assert code == S.UNAVAILABLE  # a plaintext client cannot talk to a TLS port
    finally:
        service.stop()
