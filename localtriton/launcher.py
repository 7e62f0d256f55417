"""Start the real Triton server (from `nvidia-pytriton`, in .venv-triton) on CPU, locally.

The recipe (see docs/architecture.md and ../shared/brief/FINDINGS.md):
- a backends folder of our own with the python backend's three files *copied* (Triton refuses a
  symlink that "escapes the backend directory"), plus our `onnxruntime` shim as a python-based
  backend, so NGC-style ONNX models load unmodified;
- `LD_LIBRARY_PATH` = the Triton venv's Python LIBDIR + `nvidia_pytriton.libs`, and the Triton venv's
  `bin` first on `PATH` (the stub finds its interpreter as `python3` on PATH; the wrong libpython
  crashes it);
- loopback-only ports, explicit model control (load / unload versions through the API, no restart),
  readiness polled over HTTP;
- its own process group (the python-backend stubs are forked into it): `stop()` signals the whole
  group and then removes what a crashed server leaves behind (orphaned stubs, /dev/shm regions).
  `localtriton/supervisor.py` restarts it when it dies.
In production the NGC `tritonserver` container serves the same `triton_models/` (docs/triton.md).
"""

from __future__ import annotations

import filecmp
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import psutil

from modelrepo.admin import admin_key as load_admin_key, restriction_flags
from modelrepo.layout import MODEL_REPOSITORY, PROJECT_ROOT, loadable_models

log = logging.getLogger(__name__)

TRITON_VENV = PROJECT_ROOT / ".venv-triton"
SHIM = Path(__file__).with_name("onnxruntime_shim.py")
STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
# The stub's command line: stub, model path, shm region name, default size, growth size, server pid, ...
_STUB_SHM_ARG, _STUB_SERVER_PID_ARG = 2, 5


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


def install_file(src: Path, dst: Path) -> bool:
    """Put a copy of `src` at `dst` atomically; return whether anything was written.

    Writing into `dst` fails with "Text file busy" while a stub of an earlier server still runs
    from it; renaming a new file over it works (the running stub keeps the old inode), and an
    identical file is left alone, so a restart next to stray stubs never trips on it.
    """
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
        os.chmod(tmp, src.stat().st_mode & 0o7777)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def prepare_backends(dest: Path, venv: Path = TRITON_VENV) -> Path:
    """Lay out `dest/python` (copied python backend) and `dest/onnxruntime/model.py` (the shim).
    Idempotent, also while stubs of an earlier server still run from `dest` (see `install_file`)."""
    tritonserver = _site_packages(venv) / "pytriton" / "tritonserver"
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        tritonserver / "backends" / "python" / "libtriton_python.so",
        tritonserver / "backends" / "python" / "triton_python_backend_utils.py",
        tritonserver / "python_backend_stubs" / "3.11" / STUB_NAME,
    ):
        install_file(src, python_dir / src.name)
    (dest / "onnxruntime").mkdir(exist_ok=True)
    install_file(SHIM, dest / "onnxruntime" / "model.py")
    return dest


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def stub_processes(stub: Path) -> list[tuple[psutil.Process, list[str]]]:
    """Running python-backend stubs started from this stub file (i.e. by servers of one workdir).
    Matched on argv[0]: after the file was replaced, /proc/PID/exe says "(deleted)"."""
    wanted = os.path.realpath(stub)
    found = []
    for proc in psutil.process_iter():
        cmd = _cmdline(proc)
        if len(cmd) > _STUB_SERVER_PID_ARG and cmd[0].endswith(STUB_NAME) and os.path.realpath(cmd[0]) == wanted:
            found.append((proc, cmd))
    return found


def _server_alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) tritonserver: stubs only serve a live server."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() == "tritonserver"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_stubs(stubs: list[tuple[psutil.Process, list[str]]], timeout_s: float = 10.0) -> int:
    """SIGKILL stubs (they ignore SIGTERM), wait for them, and unlink their shared-memory regions
    (a killed stub cannot remove its own). Returns how many were killed."""
    procs = []
    for proc, cmd in stubs:
        try:
            proc.kill()
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)
    for _, cmd in stubs:
        region = os.path.basename(cmd[_STUB_SHM_ARG])  # shm_open("/name") lives at /dev/shm/name
        if region:
            (SHM_DIR / region).unlink(missing_ok=True)
    return len(procs)


def reap_orphaned_stubs(backends: Path) -> int:
    """Kill stubs left running from `backends` by a server that is gone or a zombie (a crash, or a
    launcher killed without cleanup); stubs of a live server sharing the workdir are left alone."""
    orphans = [(p, cmd) for p, cmd in stub_processes(backends / "python" / STUB_NAME)
               if not cmd[_STUB_SERVER_PID_ARG].isdigit() or not _server_alive(int(cmd[_STUB_SERVER_PID_ARG]))]
    return kill_stubs(orphans) if orphans else 0


@dataclass
class TritonServer:
    model_repository: Path = MODEL_REPOSITORY
    workdir: Path = PROJECT_ROOT / "var" / "triton"
    models: tuple[str, ...] = ()  # loaded at start-up; empty: every model that has an exported version
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    log_verbose: int = 0
    # Model control (load/unload/index), shared memory, statistics, trace and logging answer only
    # calls carrying this key (modelrepo/admin.py); inference, health and metadata stay open.
    admin_key: str = field(default_factory=lambda: load_admin_key(create=True), repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    # Prefix of the python backend's /dev/shm regions, new for every start: cleanup after a crash
    # removes exactly this server's regions, never those of other servers on the machine.
    shm_prefix: str = field(default="", repr=False)
    _cleaned: int = field(default=0, repr=False)  # pid of the server process already cleaned up after

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def backends(self) -> Path:
        return self.workdir / "backends"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def command(self, models: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
        """`models`: loaded at start-up; None: `self.models`, else every loadable one; []: none
        (the supervisor then loads exactly the versions that were serving)."""
        if models is None:
            models = self.models or loadable_models(self.model_repository)
        site = _site_packages(TRITON_VENV)
        tritonserver = site / "pytriton" / "tritonserver"
        backends = prepare_backends(self.backends)
        names = ("grpc_port", "http_port", "metrics_port")
        for name in names:
            # free_port() releases the port it found, so two calls can return the same one:
            # tritonserver then refuses to start ("cannot listen ... at the same address and port").
            while not getattr(self, name) or getattr(self, name) in [getattr(self, n) for n in names if n != name]:
                setattr(self, name, free_port())
        self.shm_prefix = f"recsys_triton_{self.grpc_port}_{secrets.token_hex(4)}_"
        cmd = [
            str(tritonserver / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={tritonserver / 'caches'}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            *restriction_flags(self.admin_key),
            *[f"--load-model={m}" for m in models],
            "--strict-readiness=true",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
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

    def launch(self, models: Sequence[str] | None = None) -> subprocess.Popen:
        """Start tritonserver without waiting for readiness (the supervisor polls it itself)."""
        cmd, env = self.command(models)
        reap_orphaned_stubs(self.backends)  # ~480 MB of a dead server's stubs would otherwise stay
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():  # keep the previous run's log: after a crash, the reason is there
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        with open(self.log_path, "wb") as log:
            # Own session and process group: Ctrl-C in a terminal does not reach it (we stop it in
            # order), and `stop()` can signal the server and every stub it forked at once.
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.process

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        self.launch()
        self.wait_ready(timeout_s)
        self.pin_verdicts()
        return self

    def pin_verdicts(self) -> dict[str, int]:
        """Give each loaded ensemble its served version's validation verdict (the ranker's
        `beats_blend`, modelrepo/publish.py `pin_verdicts`): a fresh start loads the committed
        configs, which carry none, and the gateway's ranker_mode auto would never apply a proven
        ranker that was exported but not published."""
        from modelrepo.publish import pin_verdicts

        try:
            return pin_verdicts(self.grpc_url, self.model_repository, self.admin_key)
        except Exception as e:  # the server serves; without the verdict only ranker_mode auto is off, as before
            log.warning("could not give the ensembles their versions' verdicts (a proven ranker stays off in "
                        "ranker_mode auto until it is published): %s", e)
            return {}

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
                code = self.process.returncode
                self.stop()  # its stubs and shm regions
                raise RuntimeError(f"tritonserver exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """End the server and everything it started, also after it crashed: SIGTERM to its process
        group (stubs ignore it and exit when the server unloads them), SIGKILL to the group after
        `timeout_s`, reap it (no zombie), then kill leftover stubs and remove its shm regions."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the server leads its own group
        if self.process.poll() is None:
            _killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                self.process.wait()
        self.cleanup()

    def cleanup(self) -> int:
        """After the server has exited: kill this server's stubs still alive (a crashed server's
        stubs keep running; a zombie server keeps them waiting forever) and unlink this start's
        /dev/shm regions. Returns the number of stubs killed."""
        if self.process is None or self.process.poll() is None or self._cleaned == self.process.pid:
            return 0
        pid = self.process.pid
        # Once only per server process: later its pid (= the group id) may belong to someone else.
        self._cleaned = pid
        _killpg(pid, signal.SIGKILL)  # whatever is left of the group: stubs keep the server's pgid
        mine = []
        for proc, cmd in stub_processes(self.backends / "python" / STUB_NAME):
            try:
                in_group = os.getpgid(proc.pid) == pid
            except OSError:
                in_group = False
            if in_group or cmd[_STUB_SERVER_PID_ARG] == str(pid) or os.path.basename(cmd[_STUB_SHM_ARG]).startswith(self.shm_prefix):
                mine.append((proc, cmd))
        killed = kill_stubs(mine)
        if self.shm_prefix:
            for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
        return killed

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass
