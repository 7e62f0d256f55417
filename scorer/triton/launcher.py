"""Start the real Triton server (from `nvidia-pytriton`, in .venv-triton) on CPU, locally.

The recipe (see docs/architecture.md and ../shared/brief/FINDINGS.md):
- a backends folder of our own with the python backend's three files *copied* (Triton refuses a
  symlink that "escapes the backend directory"), plus our `onnxruntime` shim as a python-based
  backend, so NGC-style ONNX models load unmodified;
- `LD_LIBRARY_PATH` = the Triton venv's Python LIBDIR + `nvidia_pytriton.libs`, and the Triton venv's
  `bin` first on `PATH` (the stub finds its interpreter as `python3` on PATH; the wrong libpython
  crashes it);
- loopback-only ports, explicit model control (load / unload versions through the API, no restart),
  readiness polled over HTTP, SIGTERM on stop.
In production the NGC `tritonserver` container serves the same `triton_models/` (docs/triton.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scorer.export.triton_repo import loadable_models

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRITON_VENV = PROJECT_ROOT / ".venv-triton"
MODEL_REPOSITORY = PROJECT_ROOT / "triton_models"
SHIM = Path(__file__).with_name("onnxruntime_shim.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise RuntimeError(f"no site-packages in {venv}: run scripts/setup.sh")
    return found[0]


def _python_libdir(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def prepare_backends(dest: Path, venv: Path = TRITON_VENV) -> Path:
    """Lay out `dest/python` (copied python backend) and `dest/onnxruntime/model.py` (the shim)."""
    tritonserver = _site_packages(venv) / "pytriton" / "tritonserver"
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        tritonserver / "backends" / "python" / "libtriton_python.so",
        tritonserver / "backends" / "python" / "triton_python_backend_utils.py",
        tritonserver / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
    ):
        shutil.copy2(src, python_dir / src.name)
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy2(SHIM, dest / "onnxruntime" / "model.py")
    return dest


@dataclass
class TritonServer:
    model_repository: Path = MODEL_REPOSITORY
    workdir: Path = PROJECT_ROOT / "var" / "triton"
    models: tuple[str, ...] = ()  # loaded at start-up; empty: every model that has an exported version
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    log_verbose: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        site = _site_packages(TRITON_VENV)
        tritonserver = site / "pytriton" / "tritonserver"
        backends = prepare_backends(self.workdir / "backends")
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, free_port())
        cmd = [
            str(tritonserver / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={tritonserver / 'caches'}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in (self.models or loadable_models(self.model_repository))],
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": f"{_python_libdir(TRITON_VENV)}:{site / 'nvidia_pytriton.libs'}",
            "PATH": f"{TRITON_VENV / 'bin'}:{os.environ.get('PATH', '')}",
            # Pin every math library in the stubs: 2 cores, several model instances.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
        return cmd, env

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        cmd, env = self.command()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "tritonserver.log", "wb")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        path = self.workdir / "tritonserver.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
