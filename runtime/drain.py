"""Whether a server takes new work: starting → serving → draining.

Every splitserve server (router, prefill worker, decode worker) has one `Admission`. It ties
the grpc.health.v1 status to what the handlers accept:

    starting   health NOT_SERVING; new work gets UNAVAILABLE "... is starting"
    serving    health SERVING; new work is admitted (a router whose workers cannot serve reports
               NOT_SERVING meanwhile: see set_able())
    draining   health NOT_SERVING; new work gets UNAVAILABLE "... is draining"; work already
               admitted runs to its end

"Work already admitted" is what enter() .. leave() counts (the router's Generate streams)
plus whatever the server's own `idle()` check looks at (a decode worker's reservations, a
prefill worker's queue and KV transfers). drain() returns when both are done or the drain
timeout passes; the caller then stops the gRPC server, which cuts whatever is still running.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from typing import Callable

import grpc
from grpc_health.v1 import health

from splitserve.runtime.grpc_common import set_serving

DEFAULT_DRAIN_TIMEOUT_S = 30.0
# How long a router waits for a worker to load and compile before it gives up (vLLM waits as
# long for its engine: VLLM_ENGINE_READY_TIMEOUT_S).
DEFAULT_WORKER_START_TIMEOUT_S = 600.0


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


class NotAdmitted(Exception):
    """New work arrived while the server is starting or draining."""


class Admission:
    """`name` appears in the refusal message ("router", "decode worker 127.0.0.1:4000")."""

    def __init__(self, health_servicer: health.HealthServicer | None, name: str):
        self._health = health_servicer
        self.name = name
        self._lock = threading.Condition()
        self._state = State.STARTING
        self._able = True  # False: serving, but what it depends on is down (set_able)
        self._in_flight = 0  # work between enter() and leave()

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def open(self) -> None:
        with self._lock:
            self._state = State.SERVING
            self._publish()

    def set_able(self, able: bool) -> None:
        """Whether the server could serve a request now (a router: some prefill and some decode
        worker is up). While serving, health follows it, so that a load balancer sends clients to
        another replica; calls are still admitted and get the server's own error."""
        with self._lock:
            self._able = able
            self._publish()

    def start_draining(self) -> None:
        with self._lock:
            self._state = State.DRAINING
            self._lock.notify_all()
            self._publish()

    def _publish(self) -> None:  # under the lock, so two threads cannot publish out of order
        if self._health is not None:
            set_serving(self._health, self._state is State.SERVING and self._able)

    @contextlib.contextmanager
    def admitted_or_abort(self, context: grpc.ServicerContext):
        """The handler's body counts as in flight (a drain waits for it); refused: UNAVAILABLE.
        Checking admission only at the start let a drain see an idle engine between the check
        and the work reaching the engine, and stop the worker under it."""
        try:
            self.enter()
        except NotAdmitted as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """Admits one piece of work (raises NotAdmitted); pair with leave() when it is done."""
        with self._lock:
            state = self._state
            if state is State.SERVING:
                self._in_flight += 1
                return
        raise NotAdmitted(_refusal(self.name, state))

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def drain(self, timeout_s: float, idle: Callable[[], bool] | None = None) -> bool:
        """Stops admitting, then waits until nothing tracked is in flight and `idle()` holds.

        Returns False if `timeout_s` passed first (the caller then cuts what is left).
        """
        self.start_draining()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                if self._in_flight == 0 and (idle is None or idle()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))  # idle() is polled: its owner does not notify us


def _refusal(name: str, state: State) -> str:
    return f"{name} is {state.value} and takes no new requests; retry on another server"
