"""Run a gateway on its own event loop in a background thread (demo, tests, notebooks).

Production runs `python -m gateway` / `recsys serve`; this gives the same server, in-process, with
a blocking start() that returns once health is SERVING.
"""

from __future__ import annotations

import asyncio
import threading

from gateway.config import GatewaySettings
from gateway.server import Gateway


class BackgroundGateway:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.gateway: Gateway | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def call(self, coro, timeout_s: float | None = None):
        """Run a coroutine on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self, ready_timeout_s: float = 300) -> "BackgroundGateway":
        self._thread.start()

        async def make() -> Gateway:
            return Gateway(self.settings)

        self.gateway = self.call(make())
        self.port = self.call(self.gateway.start(), 120)
        self.call(asyncio.wait_for(self.gateway.ready.wait(), ready_timeout_s), ready_timeout_s + 5)
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.call(self.gateway.stop(0.5), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "BackgroundGateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BackgroundFeedback:
    """The feedback service on its own event loop in a background thread (demo, notebooks)."""

    def __init__(self, settings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="feedback", daemon=True)
        self.port = 0
        self.running = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def __enter__(self) -> "BackgroundFeedback":
        from feedback.server import start

        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.settings), self.loop).result(120)
        self.port = self.running.port
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
