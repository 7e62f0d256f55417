"""Start a throwaway Redis Cluster (3 masters + 3 replicas) on free loopback ports (tests and benchmarks).

Six real `redis-server` processes with `--cluster-enabled yes`, joined by `redis-cli --cluster create
--cluster-replicas 1` (`replicas=2`: nine, 3 masters + 6 replicas). Durability as production should run it: AOF with `appendfsync always` (a
write acknowledged by a master is on its disk). `cluster-node-timeout` is short (1 s by default) so
a killed master's replica is promoted within a few seconds, which the failover test relies on.

All servers share one process group, so teardown (and a crashed test run's cleanup) leaves no
orphaned redis-server behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from scripts.local_redis import _ping

MASTERS = 3
BUS_OFFSET = 10000  # Redis Cluster's node-to-node bus listens on port + 10000

class ClusterStartError(RuntimeError):
    pass


@dataclass
class ClusterNodeProcess:
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF rewrite; what a crashed machine looks like to the cluster."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class RedisCluster:
    nodes: list[ClusterNodeProcess]
    workdir: Path
    node_timeout_ms: int
    redis_cli: str = field(repr=False, default="redis-cli")
    redis_server: str = field(repr=False, default="redis-server")

    @property
    def connection_string(self) -> str:
        """Feast's form for `redis_type: redis_cluster`: startup nodes, comma separated."""
        return ",".join(n.address for n in self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def cli(self, port: int, *args: str, timeout_s: float = 10.0) -> str:
        done = subprocess.run([self.redis_cli, "-h", "127.0.0.1", "-p", str(port), *args],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def node(self, port: int) -> ClusterNodeProcess:
        return next(n for n in self.nodes if n.port == port)

    def restart(self, port: int) -> ClusterNodeProcess:
        """Start a killed node again on its port, directory and nodes.conf (its AOF too): it rejoins
        the cluster, as a replica of whichever node took over its slots."""
        node = self.node(port)
        if node.alive():
            raise RuntimeError(f"node {port} is still running")
        fresh = _start_node(self.redis_server, port, self.workdir, self.node_timeout_ms, pgid=_group(self.nodes) or 0)
        node.process = fresh.process
        return node

    def wait_replicated(self, min_replicas: int = 1, timeout_s: float = 60.0) -> None:
        """Block until each of the 3 masters has at least `min_replicas` replicas linked and synced
        (`state=online`): what `WAIT n` counts (after a failover too, when a replica has moved to the
        promoted master)."""
        deadline = time.monotonic() + timeout_s
        while True:
            masters = self.masters()
            infos = [self.cli(p, "info", "replication") for p in masters]
            linked = sum(info.count("state=online") >= min_replicas for info in infos)
            if len(masters) == MASTERS and linked == MASTERS:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"masters with {min_replicas}+ synced replicas: {linked}/{MASTERS} after "
                                        f"{timeout_s:.0f} s; logs in {self.workdir}")
            time.sleep(0.1)

    def masters(self) -> list[int]:
        """Ports of the nodes that currently serve slots as masters (asked of a live node)."""
        return sorted(port for port, role in self.roles().items() if role == "master")

    def roles(self) -> dict[int, str]:
        """port -> 'master' / 'slave' / 'fail' as the live nodes see the cluster now."""
        answer, errors = None, []
        for n in (n for n in self.nodes if n.alive()):  # a node just restarted may not listen yet: ask another
            try:
                answer = self.cli(n.port, "cluster", "nodes")
                break
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        if answer is None:
            raise RuntimeError(f"no live node answered CLUSTER NODES: {errors}")
        out: dict[int, str] = {}
        for line in answer.splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            flags = parts[2].split(",")
            out[port] = "fail" if "fail" in flags else "master" if "master" in flags else "slave"
        return out

    def is_ok(self) -> bool:
        """Every live node says cluster_state:ok and knows all 16384 slots."""
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                info = self.cli(n.port, "cluster", "info", timeout_s=2)
            except (RuntimeError, subprocess.TimeoutExpired):
                return False
            if "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
                return False
        return True

    def wait_ok(self, timeout_s: float = 30.0) -> float:
        """Block until the cluster is ok everywhere; return how long that took."""
        t0 = time.monotonic()
        while not self.is_ok():
            if time.monotonic() - t0 > timeout_s:
                raise ClusterStartError(f"cluster not ok after {timeout_s:.0f} s; logs in {self.workdir}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after 10 s; wait for every child."""
        pgid = _group(self.nodes)
        if pgid is not None:
            for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while any(n.alive() for n in self.nodes) and time.monotonic() < deadline:
                    time.sleep(0.05)
        for n in self.nodes:
            try:
                n.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                n.process.kill()
                n.process.wait()


def _group(nodes: list[ClusterNodeProcess]) -> int | None:
    return nodes[0].process.pid if nodes else None  # the first server leads the group


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports whose cluster-bus ports (port + 10000, so below 55536) are free too."""
    rng = random.SystemRandom()
    ports: set[int] = set()
    while len(ports) < n:
        port = rng.randrange(20000, 65536 - BUS_OFFSET)
        if not {port, port + BUS_OFFSET, port - BUS_OFFSET} & ports and _bindable(port) and _bindable(port + BUS_OFFSET):
            ports.add(port)
    return sorted(ports)


def _start_node(exe: str, port: int, wd: Path, node_timeout_ms: int, pgid: int) -> ClusterNodeProcess:
    d = wd / str(port)
    d.mkdir(exist_ok=True)  # a restarted node keeps its directory: nodes.conf and the AOF
    log = d / "redis.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--logfile", str(log),
         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
         "--cluster-node-timeout", str(node_timeout_ms),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        process_group=pgid,  # 0 for the first: it becomes the group leader
    )
    return ClusterNodeProcess(port, proc, log)


@contextmanager
def local_redis_cluster(workdir: Path | None = None, node_timeout_ms: int = 1000,
                        timeout_s: float = 60.0, replicas: int = 1) -> Iterator[RedisCluster]:
    """A real Redis Cluster of 3 masters with `replicas` replicas each for the duration of the block."""
    if replicas < 1:
        raise ValueError(f"replicas: at least 1 per master, got {replicas}")
    exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if exe is None or cli is None:
        raise RuntimeError("redis-server / redis-cli not found: run scripts/setup.sh (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="redis-cluster-", dir=workdir) as tmp:
        wd = Path(tmp)
        nodes: list[ClusterNodeProcess] = []
        cluster = RedisCluster(nodes, wd, node_timeout_ms, cli, exe)
        try:
            ports = _free_ports((1 + replicas) * MASTERS)
            for port in ports:
                nodes.append(_start_node(exe, port, wd, node_timeout_ms, pgid=_group(nodes) or 0))
            deadline = time.monotonic() + timeout_s
            for n in nodes:
                while not _ping(n.port):
                    if not n.alive() or time.monotonic() > deadline:
                        raise ClusterStartError(f"redis-server on {n.port} did not start; see {n.log}")
                    time.sleep(0.05)
            done = subprocess.run([cli, "--cluster", "create", *(n.address for n in nodes),
                                   "--cluster-replicas", str(replicas), "--cluster-yes"],
                                  capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
                raise ClusterStartError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
            cluster.wait_ok(max(deadline - time.monotonic(), 1.0))
            _wait_replicas_synced(cluster, deadline, replicas)
            yield cluster
        finally:
            cluster.stop()


def _wait_replicas_synced(cluster: RedisCluster, deadline: float, replicas: int = 1) -> None:
    """Each master has its replicas connected and synced (`state=online`): else the first failover
    could find none to promote, and `WAIT 1` (the event stream's durability) times out until the
    initial sync is done (~5 s after the link)."""
    cluster.wait_replicated(replicas, max(deadline - time.monotonic(), 0.1))
