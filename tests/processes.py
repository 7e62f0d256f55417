"""Services the tests run as their own processes (real gRPC, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from recsys.v1 import feedback_pb2_grpc
from rpc.clients import channel
from scripts.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


class FeedbackProcess:
    """`python -m feedback` on a free port; `env` adds settings (e.g. the feature repo)."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.port = free_port()
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None

    def start(self) -> "FeedbackProcess":
        env = {**os.environ, "RECSYS_FEEDBACK_PORT": str(self.port), "RECSYS_EVENT_LOG_DIR": str(self.log_dir),
               "RECSYS_LOG_LEVEL": "WARNING", **self.extra_env}
        self.process = subprocess.Popen([sys.executable, "-m", "feedback"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        while "feedback service on" not in (line := self.process.stdout.readline()):  # printed once the port is open
            assert line, f"the feedback service exited: {seen[-20:]}"
            seen.append(line)
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # keep draining
        return self

    def stub(self, api_key: str | None = None) -> feedback_pb2_grpc.FeedbackServiceStub:
        """A stub whose calls send `api_key` (None: $RECSYS_API_KEY, the test shop's key)."""
        return feedback_pb2_grpc.FeedbackServiceStub(channel(f"127.0.0.1:{self.port}", api_key=api_key))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class LoggedFeedback:
    """`python -m feedback` on a free port, every line it prints kept in `lines` (FeedbackProcess
    drops its output); started once the service says it is on."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.port = free_port()
        env = {**os.environ, "RECSYS_FEEDBACK_PORT": str(self.port), "RECSYS_EVENT_LOG_DIR": str(log_dir),
               "RECSYS_LOG_LEVEL": "WARNING", **env}
        self.process = subprocess.Popen([sys.executable, "-m", "feedback"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            assert line, f"the feedback service exited: {self.lines[-20:]}"
            if "feedback service on" in line:
                break
            self.lines.append(line)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
