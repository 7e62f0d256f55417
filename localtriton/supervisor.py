"""Keep the local tritonserver serving: notice when it dies or hangs, clean up after it, restart it
on the same ports with the model versions it was serving.

Why: tritonserver 2.51 (nvidia-pytriton 0.7.0, the newest on the registry) can segfault under load
(`Signal (11)` in pthread_mutex_lock, ../shared/brief/FINDINGS.md). Unwatched, it stayed a zombie,
its python-backend stubs (~480 MB) kept running, and every client failed until someone noticed.

What is watched, every `check_interval_s`:
- the process: `Popen.poll()` reaps it, so a crashed server never lingers as a zombie (and its
  stubs, which wait for their parent's pid to vanish, do not wait forever);
- readiness over HTTP (`/v2/health/ready`, strict): unready for `unready_after_s` in a row (hung,
  or a model lost) counts as dead and the server is stopped (SIGTERM, then SIGKILL, to its group).
After a death: log why (exit code or signal, tail of tritonserver.log; the log itself is kept as
tritonserver.log.1), kill its leftover stubs and remove its /dev/shm regions (`TritonServer.stop`),
wait the backoff (0.5 s doubling to 30 s, back to 0.5 s once a server has stayed healthy for
`stable_after_s`), start it again on the same ports (clients' channels reconnect by themselves) and
restore the versions it was serving.

Versions: the publisher (modelrepo/publish.py) switches versions through Triton's model-control
API; a restarted server forgets all of it and comes up with each config's own policy (the newest two
versions, ensembles unpinned = the newest), which after a rollback is the wrong model. The publisher
keeps no record of its own and may run in another process (`recsys triton publish`, the retraining
loop), so the supervisor reads the truth from the server: while healthy it polls, every
`version_poll_s`, which versions of every model are READY and which version each ensemble is pinned
to. A restart then starts the server with no models and loads exactly that (versions first, then
the ensembles pinned: the order publish uses), so no client is ever answered by a version that was
not serving; until it is loaded they get "not ready" (the gateway degrades). Not `publish()`
itself: it derives "the old version" from the server, which just forgot it, and would drop the
encoder's previous version that gateways still embed queries with. Limit: a publish in the last
poll interval before a crash is lost (the server comes back as the last poll saw it).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from localtriton.launcher import TritonServer

log = logging.getLogger(__name__)

# A poll against a hung server must not hang the watcher, which then could not notice the hang.
_POLL_TIMEOUT_S = 2.0


class SupervisorStopped(Exception):
    """A stop (signal or `stop()`) arrived while the server was starting."""


@dataclass(frozen=True)
class ExitReason:
    kind: str  # "exited" | "signal" | "unready"
    detail: str  # for people: "killed by signal 11 (SIGSEGV)", "exited with code 1", ...
    returncode: int | None = None
    log_tail: str = ""
    at: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return self.detail

    @classmethod
    def from_returncode(cls, returncode: int, log_tail: str = "") -> "ExitReason":
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = "unknown"
            return cls("signal", f"killed by signal {-returncode} ({name})", returncode, log_tail)
        return cls("exited", f"exited with code {returncode}", returncode, log_tail)


@dataclass(frozen=True)
class ServingState:
    """What a server serves: READY versions per model (ensembles included), pinned version per ensemble."""
    loaded: dict[str, tuple[int, ...]]
    pinned: dict[str, int]


@dataclass(frozen=True)
class SupervisorEvent:
    kind: str  # "died" | "restarted" | "restart_failed"
    message: str
    restarts: int
    reason: ExitReason | None = None
    down_s: float | None = None  # "restarted": from noticing the death to ready and restored


def read_serving_state(url: str, admin_key: str | None = None) -> ServingState:
    """Every READY model version and every ensemble's pin (read as publish.py's `ready_versions` and
    `serving_version` do, but in one index call and with deadlines)."""
    from modelrepo.admin import AdminClient
    from tritonclient.utils import InferenceServerException

    client = AdminClient(url, admin_key)
    try:
        index = client.get_model_repository_index(as_json=True, client_timeout=_POLL_TIMEOUT_S).get("models", [])
        loaded: dict[str, list[int]] = {}
        for m in index:
            if m.get("state") == "READY" and m.get("version", "").isdigit():
                loaded.setdefault(m["name"], []).append(int(m["version"]))
        pinned: dict[str, int] = {}
        for name in loaded:
            try:
                config = client.get_model_config(name, as_json=True, client_timeout=_POLL_TIMEOUT_S)["config"]
            except InferenceServerException:
                continue
            if config.get("platform") != "ensemble":
                continue
            steps = {int(s.get("model_version", -1)) for s in config["ensemble_scheduling"]["step"]}
            if len(steps) == 1 and -1 not in steps:  # as publish.serving_version: None = unpinned
                pinned[name] = steps.pop()
        return ServingState({k: tuple(sorted(v)) for k, v in loaded.items()}, pinned)
    finally:
        client.close()


def restore_serving_state(url: str, repo: Path, state: ServingState, admin_key: str | None = None) -> list[str]:
    """Load what `state` says onto the server at `url` (started with no models); return what was
    loaded (for the log). The order publish uses: models with their exact versions first (in
    parallel: each load is seconds of ONNX session set-up on CPU), then the ensembles, pinned
    where they were, since a pinned step must already be loaded. A version that no longer loads
    (files deleted meanwhile) falls back to the model's config default rather than serving nothing."""
    from modelrepo.admin import AdminClient
    from modelrepo.publish import load_with_versions, pin_ensemble, read_config

    now = read_serving_state(url, admin_key)

    def is_ensemble(model: str) -> bool:
        try:
            return read_config(repo, model).platform == "ensemble"
        except OSError:  # its folder is gone: loading it fails below, and is reported
            return False

    ensembles = {m for m in state.loaded if is_ensemble(m)}
    client = AdminClient(url, admin_key)

    def load(model: str) -> str:
        versions = list(state.loaded[model])
        try:
            if model in state.pinned:
                pin_ensemble(client, repo, model, state.pinned[model])
                return f"{model} pinned to v{state.pinned[model]}"
            if model in ensembles:
                client.load_model(model)
                return model
            load_with_versions(client, repo, model, versions)
            return f"{model} v{','.join(map(str, versions))}"
        except Exception as e:
            log.error("could not restore %s %s (%s); loading its default", model, versions, e)
        try:
            client.load_model(model)
            return f"{model} (its default)"
        except Exception as e:  # as a fresh start would: serve the others without it
            log.error("could not load %s at all: %s", model, e)
            return f"{model} (NOT loaded: {str(e).splitlines()[0]})"

    try:
        todo = [m for m in state.loaded if now.loaded.get(m) != state.loaded[m] or state.pinned.get(m) != now.pinned.get(m)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            done = list(pool.map(load, [m for m in todo if m not in ensembles]))
        return done + [load(m) for m in todo if m in ensembles]
    finally:
        client.close()


class TritonSupervisor:
    """Owns a `TritonServer`: `start()` it, it is watched and restarted in a background thread,
    `stop()` ends it and its stubs and waits for them. `restarts`, `last_exit` and `serving` say
    what happened; `on_event` (called from the watcher thread) hears each death and restart."""

    def __init__(self, server: TritonServer, *, check_interval_s: float = 0.5, unready_after_s: float = 10.0,
                 version_poll_s: float = 5.0, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 stable_after_s: float = 60.0, start_timeout_s: float = 120.0,
                 on_event: Callable[[SupervisorEvent], None] | None = None):
        self.server = server
        self.check_interval_s = check_interval_s
        self.unready_after_s = unready_after_s
        self.version_poll_s = version_poll_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.start_timeout_s = start_timeout_s
        self.on_event = on_event
        self.restarts = 0
        self.last_exit: ExitReason | None = None
        self.serving: ServingState | None = None
        self.received_signal: int | None = None
        self._backoff = backoff_initial_s
        self._healthy_since = 0.0
        self._unready_since: float | None = None
        self._last_poll = 0.0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # launch / stop of the server: never both at once
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "TritonSupervisor":
        """Start the server (errors of the first start are raised: a bad repository or a busy
        port is not something a restart fixes) and begin watching it."""
        self._launch_and_wait()
        self.server.pin_verdicts()
        self._healthy_since = time.monotonic()
        self._poll_versions()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop watching, then stop the server and its stubs (waits for all of them)."""
        self._stopping.set()
        with self._lock:
            self.server.stop(timeout_s)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s + 10)
        with self._lock:  # idempotent; covers a server the watcher had launched just before
            self.server.stop(timeout_s)

    def wait(self) -> None:
        """Block until a stop is requested (signal or `stop()`)."""
        while not self._stopping.wait(1.0):
            pass

    @contextlib.contextmanager
    def signals_stop(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator["TritonSupervisor"]:
        """Inside: SIGTERM / SIGINT request a stop (also during start-up); on leaving, the server and
        its stubs are stopped before the previous handlers come back, so a second Ctrl-C cannot cut
        the shutdown short. Main thread only (Python delivers signals there)."""
        def request_stop(signum: int, _frame) -> None:
            self.received_signal = self.received_signal or signum
            self._stopping.set()

        previous = {s: signal.signal(s, request_stop) for s in signals}
        try:
            yield self
        except SupervisorStopped:
            pass
        finally:
            try:
                self.stop()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def __enter__(self) -> "TritonSupervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- watching ----------------------------------------------------------------------------

    def _launch_and_wait(self, models: list[str] | None = None) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise SupervisorStopped()
            process = self.server.launch(models)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.is_ready():
            if self._stopping.is_set():
                raise SupervisorStopped()  # `stop()` ends the half-started server
            if process.poll() is not None:
                reason = ExitReason.from_returncode(process.returncode, self.server.log_tail(20))
                with self._lock:
                    self.server.stop()
                raise RuntimeError(f"tritonserver {reason} while starting:\n{reason.log_tail}")
            if time.monotonic() > deadline:
                with self._lock:
                    self.server.stop(timeout_s=5)
                raise TimeoutError(f"tritonserver not ready after {self.start_timeout_s:.0f}s:\n{self.server.log_tail(20)}")
            self._stopping.wait(0.2)

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_interval_s):
            reason = self._check()
            if reason is None:
                now = time.monotonic()
                if now - self._healthy_since >= self.stable_after_s:
                    self._backoff = self.backoff_initial_s  # it stayed up: a new crash starts over
                if now - self._last_poll >= self.version_poll_s:
                    self._poll_versions()
                continue
            try:
                self._recover(reason)
            except SupervisorStopped:
                return

    def _check(self) -> ExitReason | None:
        """None while healthy; why it is not otherwise."""
        process = self.server.process
        if process is None:
            return ExitReason("exited", "no process")
        if process.poll() is not None:  # also reaps it: no zombie
            return ExitReason.from_returncode(process.returncode, self.server.log_tail(20))
        if self.server.is_ready():
            self._unready_since = None
            return None
        now = time.monotonic()
        if self._unready_since is None:
            self._unready_since = now
        if now - self._unready_since < self.unready_after_s:
            return None
        return ExitReason("unready", f"not ready for {now - self._unready_since:.0f} s (hung?)", None,
                          self.server.log_tail(20))

    def _poll_versions(self) -> None:
        self._last_poll = time.monotonic()
        try:
            self.serving = read_serving_state(self.server.grpc_url, self.server.admin_key)
        except Exception as e:  # busy or dying: keep the last known state, the check decides
            log.debug("version poll failed: %s", e)

    def _recover(self, reason: ExitReason) -> None:
        noticed = time.monotonic()
        self.last_exit = reason
        log.warning("tritonserver %s; restarting in %.1f s. Last log lines:\n%s", reason, self._backoff, reason.log_tail)
        self._emit(SupervisorEvent("died", f"tritonserver {reason}; restarting in {self._backoff:.1f} s",
                                   self.restarts, reason))
        with self._lock:
            # Exited: reap, kill its stubs, unlink its shm. Unready: stop it first (it had its
            # `unready_after_s` already, so only a short grace before SIGKILL).
            self.server.stop(timeout_s=3)
        while True:
            delay, self._backoff = self._backoff, min(self._backoff * 2, self.backoff_max_s)
            if self._stopping.wait(delay):
                raise SupervisorStopped()
            try:
                restored = self._restart()
                if self._stopping.is_set():  # stopped mid-restore: nothing to report
                    raise SupervisorStopped()
                break
            except SupervisorStopped:
                raise
            except Exception as e:
                if self._stopping.is_set():  # `stop()` killed it mid-restore
                    raise SupervisorStopped() from e
                log.error("restart failed (next try in %.1f s): %s", self._backoff, e)
                self._emit(SupervisorEvent("restart_failed", f"restart failed: {str(e).splitlines()[0]}",
                                           self.restarts, reason))
                with self._lock:
                    self.server.stop(timeout_s=3)
        self.restarts += 1
        self._unready_since = None
        self._healthy_since = time.monotonic()
        self._poll_versions()
        down_s = self._healthy_since - noticed
        what = f"; restored {', '.join(restored)}" if restored else ""
        log.warning("tritonserver restarted (#%d, %.1f s after it died)%s", self.restarts, down_s, what)
        self._emit(SupervisorEvent("restarted", f"tritonserver restarted (#{self.restarts}) in {down_s:.1f} s{what}",
                                   self.restarts, reason, down_s))

    def _restart(self) -> list[str]:
        """Start the server again and make it serve what it served. With a known state it starts
        with no models and loads exactly those versions: starting with the configs' defaults and
        correcting afterwards would answer clients with the wrong version (after a rollback: the
        newest) for the second or two before the correction; now they get "model not ready" for
        that time, which the gateway handles as degraded."""
        state = self.serving
        if state is None:  # never read (no successful poll): the configs' defaults
            self._launch_and_wait()
            return [f"{m} pinned to v{v} (its verdict)" for m, v in self.server.pin_verdicts().items()]
        self._launch_and_wait([])
        restored = restore_serving_state(self.server.grpc_url, self.server.model_repository, state, self.server.admin_key)
        # A restored pin carries its version's verdict (pin_ensemble); an ensemble restored unpinned
        # gets it as on a fresh start.
        return restored + [f"{m} pinned to v{v} (its verdict)" for m, v in self.server.pin_verdicts().items()]

    def _emit(self, event: SupervisorEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a broken callback must not stop the supervision
                log.exception("on_event callback failed")
