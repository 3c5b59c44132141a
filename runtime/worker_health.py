"""The router's view of which workers are up.

    request path (router threads)               prober thread (one, daemon)
    RPC to a worker fails UNAVAILABLE           every `interval_s`: grpc.health.v1 Check on
      └─► mark_down(address) ──► down set ◄────   every worker
    choosing a worker: is_up(address)              SERVING      ─► up (on_up(address) first)
                                                   anything else ─► down

So a worker that died (or drains, or restarts) is skipped from its first failed call or
the next probe, whichever comes first, and taken back once it reports SERVING again. A
request-level UNAVAILABLE from a live worker costs it at most one probe interval.
`on_change()` runs after every such change (the router server turns its own health with it).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.runtime.grpc_common import ChannelPool

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0


class WorkerHealth:
    """Up/down per worker address. Every worker starts up (the router waits for SERVING first).

    `on_up(address)`: called by the prober before a down worker is taken back (refresh its stats).
    `on_change()`: called after a worker went down or came back (set later, by the owner's owner).
    """

    def __init__(self, addresses: Iterable[str], channels: ChannelPool, *,
                 on_up: Callable[[str], None] = lambda address: None, interval_s: float = PROBE_INTERVAL_S):
        self._addresses = list(dict.fromkeys(addresses))
        self._channels = channels
        self._on_up = on_up
        self.on_change: Callable[[], None] = lambda: None
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}  # address -> why
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_up(self, address: str) -> bool:
        with self._lock:
            return address not in self._down

    def down(self) -> dict[str, str]:
        with self._lock:
            return dict(self._down)

    def mark_down(self, address: str, why: str) -> None:
        with self._lock:
            newly = address not in self._down
            self._down[address] = why
        if newly:
            log.warning("worker %s is down (%s); skipping it until it reports SERVING", address, why)
            self.on_change()

    def _mark_up(self, address: str) -> None:
        with self._lock:
            if address not in self._down:
                return
        self._on_up(address)
        with self._lock:
            self._down.pop(address, None)
        log.warning("worker %s reports SERVING again; taking it back", address)
        self.on_change()

    # -- the prober -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._probe_forever, name="worker-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PROBE_TIMEOUT_S + self._interval_s)

    def _probe_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            for address in self._addresses:
                self.probe(address)

    def probe(self, address: str) -> bool:
        """Checks one worker now and updates its state; True if it reports SERVING."""
        stub = health_pb2_grpc.HealthStub(self._channels.get(address))
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S).status
        except grpc.RpcError as e:
            self.mark_down(address, f"health check failed: {e.code().name}")
            return False
        if status != health_pb2.HealthCheckResponse.SERVING:
            self.mark_down(address, f"reports {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
            return False
        try:
            self._mark_up(address)
        except Exception:  # noqa: BLE001 - a failed on_up keeps it down; the next probe tries again
            log.exception("taking worker %s back failed", address)
            return False
        return True
