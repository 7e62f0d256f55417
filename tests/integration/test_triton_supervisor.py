"""The supervised tritonserver: restarts after a crash with its serving versions, leaves nothing
behind on SIGTERM, and starts next to a dead server's stubs (all against the real server)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from localtriton.launcher import STUB_NAME, TritonServer, free_port, install_file, stub_processes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENCODER_MODELS = ("text_tokenizer", "encoder_onnx", "encoder")
RESTART_BUDGET_S = 60.0  # SIGKILL -> first answer, on 2 slow shared cores (measured ~7-10 s)


def _link_copy(src: Path, dst: Path) -> None:
    """Hard-linked copy: the model files are never written, so the shared fixture stays untouched."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory) -> Path:
    """A private copy of `models` plus encoder v2 (same files): the configs' default after a restart
    (newest, unpinned) is then v2, so a restored rollback to v1 is visible in ENCODER_VERSION."""
    repo = tmp_path_factory.mktemp("sup_models") / "models"
    _link_copy(models, repo)
    for component in ("text_tokenizer", "encoder_onnx"):
        _link_copy(repo / component / "1", repo / component / "2")
    return repo


def _stubs_of(server_pid: int, workdir: Path) -> list[psutil.Process]:
    return [p for p, cmd in stub_processes(workdir / "backends" / "python" / STUB_NAME) if cmd[5] == str(server_pid)]


def _gone(procs: list[psutil.Process]) -> bool:
    return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs)


def test_sigkill_restarts_with_pinned_version(repo, tmp_path):
    from gateway.triton_client import TritonClient, TritonError
    from modelrepo.publish import publish
    from localtriton.supervisor import TritonSupervisor

    events = []
    server = TritonServer(model_repository=repo, workdir=tmp_path / "run")
    sup = TritonSupervisor(server, version_poll_s=1.0, on_event=events.append).start()
    try:
        # A rollback to v1 through the model-control API: only the live server knows about it.
        assert publish(server.grpc_url, repo, "encoder", 1) == 2
        deadline = time.monotonic() + 15
        while not (sup.serving and sup.serving.pinned.get("encoder") == 1):
            assert time.monotonic() < deadline, f"supervisor never saw the pin: {sup.serving}"
            time.sleep(0.2)
        assert sup.serving.loaded["encoder_onnx"] == (1, 2)
        ports = (server.grpc_port, server.http_port, server.metrics_port)
        old_pid, old_prefix = server.process.pid, server.shm_prefix
        old_stubs = _stubs_of(old_pid, server.workdir)
        assert len(old_stubs) >= 5  # one per model version: 2 encoder versions, ranker, interest model

        async def kill_and_time() -> tuple[float, str]:
            client = TritonClient(server.grpc_url)  # one long-lived client, like the gateway's
            try:
                _, before = await client.embed_versioned(["waterproof jacket"], timeout_s=10)
                assert before == "1"
                os.kill(old_pid, signal.SIGKILL)  # the server only, not the supervisor
                t0 = time.monotonic()
                while True:
                    try:
                        vectors, version = await client.embed_versioned(["waterproof jacket"], timeout_s=2)
                        assert vectors.shape == (1, 384)
                        return time.monotonic() - t0, version
                    except TritonError:
                        assert time.monotonic() - t0 < RESTART_BUDGET_S, f"no answer; events: {events}"
                        await asyncio.sleep(0.1)
            finally:
                await client.close()

        elapsed, version = asyncio.run(kill_and_time())
        print(f"\nSIGKILL -> first answer through a long-lived client: {elapsed:.1f} s; events: "
              f"{[e.message for e in events]}")
        assert elapsed < RESTART_BUDGET_S
        assert version == "1", "restarted server forgot the pinned (rolled back) encoder version"
        assert sup.restarts == 1 and sup.last_exit is not None and "SIGKILL" in str(sup.last_exit)
        assert [e.kind for e in events] == ["died", "restarted"]
        assert (server.grpc_port, server.http_port, server.metrics_port) == ports
        assert server.process.pid != old_pid
        # Nothing left of the killed server: its stubs and its /dev/shm regions.
        assert _gone(old_stubs), [p.pid for p in old_stubs if p.is_running()]
        assert not list(Path("/dev/shm").glob(f"{old_prefix}*"))
        assert sup.serving.pinned.get("encoder") == 1 and sup.serving.loaded["encoder_onnx"] == (1, 2)
        assert len(_stubs_of(server.process.pid, server.workdir)) >= 5
    finally:
        sup.stop()
    assert server.process.poll() is not None
    assert not _stubs_of(server.process.pid, server.workdir)
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_sigterm_to_cli_stops_server_and_stubs(repo, tmp_path):
    encoder_only = tmp_path / "models"  # 2 stubs are enough and start faster than 5
    for model in ENCODER_MODELS:
        _link_copy(repo / model, encoder_only / model)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "recsys"), "triton", "serve", "--repo", str(encoder_only),
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
           "--workdir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        server, deadline = None, time.monotonic() + 120
        while server is None or len(_stubs_of(server.pid, tmp_path / "run")) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "tritonserver did not come up under `recsys triton serve`"
            time.sleep(0.3)
            servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "tritonserver"]
            server = servers[0] if servers else None
            if server is not None and not _ready(http_port):
                server = None
        stubs = _stubs_of(server.pid, tmp_path / "run")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=40)
        took = time.monotonic() - t0
        print(f"\nSIGTERM -> recsys exited in {took:.1f} s\n{out}")
        assert proc.returncode == 0, out
        assert not server.is_running() and _gone(stubs)
        assert not _stubs_of(server.pid, tmp_path / "run")
        assert "stopped" in out and "SIGTERM" in out
        assert "Warning" not in out and "warn" not in out.lower(), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_beside_stubs_of_a_killed_server(repo, tmp_path):
    workdir = tmp_path / "run"
    first = TritonServer(model_repository=repo, workdir=workdir, models=ENCODER_MODELS).start(timeout_s=180)
    second = None
    try:
        stubs = _stubs_of(first.process.pid, workdir)
        assert len(stubs) >= 2  # tokenizer + encoder, per loaded version
        os.kill(first.process.pid, signal.SIGKILL)  # not reaped: a zombie, as under the old launcher
        time.sleep(1)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stubs)
        second = TritonServer(model_repository=repo, workdir=workdir, models=ENCODER_MODELS).start(timeout_s=180)
        assert second.is_ready()
        assert _gone(stubs), "the dead server's stubs were left running"
        first.stop()  # reaps the zombie; must not touch the second server's stubs
        assert second.is_ready() and len(_stubs_of(second.process.pid, workdir)) == len(stubs)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_install_file_replaces_a_running_executable(tmp_path):
    """The case `prepare_backends` meets when a stub still runs with different (e.g. upgraded)
    content: writing into the busy file fails, renaming over it does not."""
    target = tmp_path / "prog"
    shutil.copy2(shutil.which("sleep"), target)
    running = subprocess.Popen([str(target), "30"])
    try:
        time.sleep(0.2)
        with pytest.raises(OSError, match="Text file busy"):
            shutil.copy2(sys.executable, target)
        assert install_file(Path(sys.executable), target) is True
        assert install_file(Path(sys.executable), target) is False  # identical: left alone
        assert running.poll() is None
    finally:
        running.kill()
        running.wait()


def _ready(http_port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


GATEWAY_RANKED_AGAIN_S = 45.0  # SIGKILL of tritonserver -> the gateway's first fully ranked answer (2 slow cores)


def test_gateway_answers_ranked_again_after_tritonserver_is_sigkilled(feature_repo, models, tmp_path, tmp_path_factory):
    """The whole chain: the supervisor restarts the server, the gateway's channel reconnects (1 s
    backoff cap) and its Triton watch closes the breakers: ranked answers again, unattended."""
    from cli.background import BackgroundGateway
    from rpc.clients import GatewayClient
    from localtriton.supervisor import TritonSupervisor
    from tests.integration.test_gateway import _settings

    server = TritonServer(model_repository=models, workdir=tmp_path / "run")
    sup = TritonSupervisor(server).start()
    try:
        settings = _settings(feature_repo, server, tmp_path_factory)
        with BackgroundGateway(settings) as gw, GatewayClient(gw.address, 10) as c:
            assert not c.recommend("waterproof rain jacket").degraded
            os.kill(server.process.pid, signal.SIGKILL)
            t0 = time.monotonic()
            degraded_seen = 0
            n = 0
            while True:
                n += 1  # a fresh query each time: no cached embedding hides the encoder's absence
                response = c.recommend(f"waterproof rain jacket {n % 7} hood", num_results=5)
                if not response.degraded and time.monotonic() - t0 > 0.5:
                    break
                degraded_seen += response.degraded
                assert time.monotonic() - t0 < GATEWAY_RANKED_AGAIN_S, (sup.restarts, list(response.degraded_reasons))
                time.sleep(0.1)
            elapsed = time.monotonic() - t0
            print(f"\nSIGKILL of tritonserver -> ranked answers from the gateway again after {elapsed:.1f} s "
                  f"({degraded_seen} degraded answers meanwhile, none failed)")
            assert sup.restarts == 1 and degraded_seen > 0
            assert "ranker" in response.model_versions
    finally:
        sup.stop()


RANKER_MODELS = ("pair_tokenizer", "ranker_onnx", "ranker")


def test_a_proven_rankers_verdict_is_served_after_a_fresh_start_and_after_a_restart(models, tmp_path):
    """A ranker exported with `beats_blend` true and never published (`recsys export ranker`,
    `recsys train all` without --url): a fresh start serves its verdict in the `ranker` ensemble's
    config (what the gateway's ranker_mode auto reads), and so does the server the supervisor
    restarts after a SIGKILL. Before, only a publish set it: a fresh start or a restart served the
    committed config, and auto never applied the ranker."""
    from contract.ranker_inputs import RANKER_VERDICT_PARAMETER
    from gateway.triton_client import TritonClient
    from localtriton.supervisor import TritonSupervisor
    from modelrepo.layout import write_validation

    repo = tmp_path / "models"
    for model in RANKER_MODELS:
        _link_copy(models / model, repo / model)
    for component in RANKER_MODELS[:2]:  # v2: the same files, plus a verdict (a new file, not a linked one)
        _link_copy(repo / component / "1", repo / component / "2")
    write_validation(repo / "ranker_onnx" / "2", {RANKER_VERDICT_PARAMETER: True, "metric": "snips_ndcg@5",
                                                  "ranker": 0.61, "blend": 0.58, "lists": 40})

    async def served(url: str) -> tuple[str, str | None]:
        c = TritonClient(url)
        try:
            return (await c.serving_version("ranker", "ranker_onnx"),
                    await c.config_parameter("ranker", RANKER_VERDICT_PARAMETER))
        finally:
            await c.close()

    events = []
    server = TritonServer(model_repository=repo, workdir=tmp_path / "run")
    sup = TritonSupervisor(server, version_poll_s=1.0, on_event=events.append).start()
    try:
        assert asyncio.run(served(server.grpc_url)) == ("2", "true")
        deadline = time.monotonic() + 15
        while not (sup.serving and sup.serving.pinned.get("ranker") == 2):
            assert time.monotonic() < deadline, f"supervisor never saw the pin: {sup.serving}"
            time.sleep(0.2)
        os.kill(server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + RESTART_BUDGET_S
        while sup.restarts < 1:
            assert time.monotonic() < deadline, f"no restart; events: {[e.message for e in events]}"
            time.sleep(0.2)
        assert asyncio.run(served(server.grpc_url)) == ("2", "true"), [e.message for e in events]
    finally:
        sup.stop()
    # A bare fresh start (no supervisor: tests, benchmarks, the demo) pins it too.
    with TritonServer(model_repository=repo, workdir=tmp_path / "run2") as bare:
        assert asyncio.run(served(bare.grpc_url)) == ("2", "true")
