"""Start a throwaway redis-server on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen

    @property
    def connection_string(self) -> str:
        """Feast's form (feature_store.redis.yaml reads it from REDIS_CONNECTION_STRING)."""
        return f"127.0.0.1:{self.port},db=0"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def local_redis(workdir: Path | None = None, timeout_s: float = 10.0) -> Iterator[RedisServer]:
    """A real redis-server (no persistence) for the duration of the block."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: run scripts/setup.sh (make test / make demo do)")
    with tempfile.TemporaryDirectory(prefix="redis-", dir=workdir) as wd:
        port = free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", wd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not _ping(port):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield RedisServer(port, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
