"""Recommend traffic from a background thread, for tests that switch models while serving."""

from __future__ import annotations

import threading
import time

import grpc

from rpc.clients import GatewayClient


class RecommendTraffic:
    """Sends one query in a loop until the block ends; records every failed call (and, when
    `degraded_is_failure`, every degraded answer), the encoder version of each answer (`versions`),
    all its model versions (`answers`) and its (item id, score) list (`results`)."""

    def __init__(self, address: str, query: str, degraded_is_failure: bool = False, user_id: str = ""):
        self.address, self.query, self.degraded_is_failure = address, query, degraded_is_failure
        self.user_id = user_id
        self.failures: list = []
        self.versions: list[str] = []
        self.answers: list[dict[str, str]] = []
        self.results: list[list[tuple[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with GatewayClient(self.address, 30) as client:
            while not self._stop.is_set():
                try:
                    r = client.recommend(self.query, user_id=self.user_id, num_results=5)
                    self.versions.append(r.model_versions["encoder"])
                    self.answers.append(dict(r.model_versions))
                    self.results.append([(i.item_id, i.score) for i in r.items])
                    if self.degraded_is_failure and r.degraded:
                        self.failures.append(list(r.degraded_reasons))
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code().name}: {e.details()}")

    def __enter__(self) -> "RecommendTraffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def wait_for_encoder(gateway, version: str, timeout_s: float = 120) -> None:
    """Until the gateway's serving snapshot uses encoder `version`."""
    deadline = time.monotonic() + timeout_s
    while gateway.gateway.state.snapshot.encoder_version != version:
        assert time.monotonic() < deadline, f"the gateway never switched to encoder v{version}"
        time.sleep(0.2)


def wait_for_answer(traffic: RecommendTraffic, model: str, version: str, timeout_s: float = 60) -> None:
    """Until the traffic's latest answer was served by `version` of `model`."""
    deadline = time.monotonic() + timeout_s
    while not traffic.answers or traffic.answers[-1].get(model) != version:
        assert time.monotonic() < deadline, f"answers never came from {model} v{version}: {traffic.answers[-1:]}"
        time.sleep(0.2)
