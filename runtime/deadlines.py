"""A client call's deadline and cancellation, carried through every stage of a request.

    client ── Generate(deadline D) ──► router: CallScope.from_context
        Decode/Reserve     timeout = min(RPC cap, D - now)
        Prefill/Run        timeout = min(RPC cap, D - now); the prefill worker reads its own
                           context deadline and drops the job if it passes in the queue
        decoded tokens     waited for until D (no limit without a client deadline); they come on
                           the worker's shared Decode/StreamBatched call, which has no deadline

When the client cancels or disconnects (or D passes), gRPC runs the handler's callbacks:
`CallScope.cancel` then cancels whichever internal call is in flight (or wakes the thread
waiting for the request's decoded tokens), so a router thread blocked on a worker returns at
once and releases the request's decode pages, and a thread waiting for pages stops waiting
(`check` raises within one poll).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import grpc

# grpc's time_remaining() without a client deadline is ~9e18 s: anything past this is "none".
NO_DEADLINE_S = 1e9


class DeadlinePassed(Exception):
    """The client's deadline passed before the request could go on."""


class CallCancelled(Exception):
    """The client cancelled or went away."""


class CallScope:
    """`deadline`: time.monotonic() value, or None. Thread-safe: gRPC runs `cancel` on its own thread."""

    def __init__(self, deadline: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.deadline = deadline
        self.clock = clock
        self._lock = threading.Lock()
        self._cancelled = False
        self._hooks: list[Callable[[], object]] = []

    @classmethod
    def from_context(cls, context: grpc.ServicerContext) -> "CallScope":
        """The scope of the call `context` serves: its deadline, cancelled when the call ends."""
        remaining = context.time_remaining()
        scope = cls(None if remaining is None or remaining > NO_DEADLINE_S else time.monotonic() + remaining)
        if not context.add_callback(scope.cancel):  # the call already ended
            scope.cancel()
        return scope

    # -- deadline -------------------------------------------------------------------------
    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def timeout(self, cap: float | None) -> float | None:
        """What an internal call may take: the time left, at most `cap`; raises once none is left."""
        self.check()
        left = self.remaining()
        if left is None:
            return cap
        return left if cap is None else min(cap, left)

    # -- cancellation ---------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled, hooks, self._hooks = True, self._hooks, []
        for hook in hooks:
            hook()

    def check(self) -> None:
        """Raises CallCancelled or DeadlinePassed if the request must stop now."""
        if self.cancelled:
            raise CallCancelled("the client cancelled the request")
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlinePassed("the request's deadline passed before it finished")

    @contextlib.contextmanager
    def cancelling(self, call: grpc.Future) -> Iterator[None]:
        """While in the block, a cancel of this scope cancels `call` (an internal RPC)."""
        with self._lock:
            cancelled = self._cancelled
            if not cancelled:
                self._hooks.append(call.cancel)
        if cancelled:
            call.cancel()
        try:
            yield
        finally:
            with self._lock:
                if call.cancel in self._hooks:
                    self._hooks.remove(call.cancel)

    def result(self, call: grpc.Future, *, every_s: float | None = None,
               while_waiting: Callable[[], object] | None = None):
        """call.result(), cancelled with this scope; CallCancelled if that happened.
        `while_waiting()` runs each `every_s` seconds until the call ends; what it raises cancels the call."""
        with self.cancelling(call):
            try:
                if while_waiting is None:
                    return call.result()
                while True:
                    try:
                        return call.result(timeout=every_s)
                    except grpc.FutureTimeoutError:
                        try:
                            while_waiting()
                        except BaseException:
                            call.cancel()
                            raise
            except grpc.FutureCancelledError:
                raise CallCancelled("the client cancelled the request") from None
