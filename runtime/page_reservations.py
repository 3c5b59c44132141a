"""Decode pages for the router's requests (step 1 of runtime/router.py).

A request reserves pages for prompt + max_tokens on the decode worker with most free pages,
before its prefill starts, so the KV that prefill sends always has somewhere to land. While every
worker is full, requests wait here in arrival order (as vLLM's waiting queue serves them): only
the first in line asks the workers again, when a reservation is released (or every
HEAD_RETRY_S, for pages freed by a lease running out), and once it has its pages the next one
asks at once. Asking in turn keeps the Reserve calls to about one per release however many wait;
when each waiter polled on its own every 50 ms, 50 waiters sent ~1000 calls a second. How many wait is
bounded by the router's admission limit (runtime/admission.py), how long by the client's
deadline, and by WAIT_FOR_PAGES_S for a client without one.

A reservation holds its pages for a lease of RESERVE_LEASE_S, so that pages whose router died are
freed; the router renews it every RENEW_EVERY_S while the prompt waits in a prefill queue, which
may take longer than a lease when many long prompts arrive at once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING

import grpc

from splitserve.protos import internal_pb2
from splitserve.runtime.deadlines import CallScope
from splitserve.runtime.kv_socket import resolve_data_address
from splitserve.runtime.router_errors import RouterError
from splitserve.runtime.worker_health import WorkerHealth

if TYPE_CHECKING:
    from splitserve.runtime.router import WorkerHandle

log = logging.getLogger(__name__)

RESERVE_LEASE_S = 30.0
RENEW_EVERY_S = RESERVE_LEASE_S / 3  # two renewals may fail or come late before the lease ends
RPC_TIMEOUT_S = 30.0
WAIT_FOR_PAGES_S = 3600.0  # a backstop, as Prefill/Run's (runtime/router.py)
HEAD_RETRY_S = 0.25  # the first in line asks again this often without a release


@dataclasses.dataclass(frozen=True)
class Reservation:
    """One attempt's pages on a decode worker, and where its KV goes: the worker's KV data socket
    and the one-time ticket for it, or (both empty) its gRPC TransferKV."""

    worker: WorkerHandle
    kv_data_address: str = ""
    kv_ticket: bytes = dataclasses.field(default=b"", repr=False)


class _Waiter:
    """A request in line for pages. Its event is set when it should look again: it became first
    in line, pages were released, or its call was cancelled (`cancel`, run by CallScope)."""

    def __init__(self):
        self.event = threading.Event()

    def cancel(self) -> None:
        self.event.set()


class PageReservations:
    """`lock` guards the workers' `free_pages` and `in_flight` (the router takes it too) and the line."""

    def __init__(self, decode_workers: list[WorkerHandle], health: WorkerHealth, lock: threading.Lock):
        self._workers = decode_workers
        self._health = health
        self._lock = lock
        self._line: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests in line for pages."""
        with self._lock:
            return len(self._line)

    def reserve(self, request_id: str, num_tokens: int, scope: CallScope) -> Reservation:
        """Reserves on the decode worker with most free pages; while all are full, waits its turn."""
        if not self.waiting:  # nobody in line: ask now, beside the other requests arriving
            reservation, _ = self._try_reserve(request_id, num_tokens, scope)
            if reservation is not None:
                return reservation
        waiter = _Waiter()
        with self._lock:
            self._line.append(waiter)
        deadline = time.monotonic() + WAIT_FOR_PAGES_S
        try:
            with scope.cancelling(waiter):
                while True:
                    scope.check()  # cancelled or past its deadline: leave the line now
                    with self._lock:
                        first = self._line[0] is waiter
                    if first:
                        reservation, full = self._try_reserve(request_id, num_tokens, scope)
                        if reservation is not None:
                            return reservation
                        if time.monotonic() > deadline:
                            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              f"no decode worker had room within {WAIT_FOR_PAGES_S:.0f}s: {full}")
                    # Not first: woken when it is, or cancelled; the timeout only looks at the deadlines.
                    timeout = HEAD_RETRY_S if first else 1.0
                    if (left := scope.remaining()) is not None:
                        timeout = max(0.0, min(timeout, left))
                    waiter.event.wait(timeout)
                    waiter.event.clear()
        finally:
            with self._lock:
                was_first = self._line[0] is waiter
                self._line.remove(waiter)
                if was_first and self._line:
                    self._line[0].event.set()  # the next in line asks at once: there may be room for it too

    def release(self, worker: WorkerHandle, request_id: str) -> None:
        try:
            worker.decode.Release(internal_pb2.ReleaseRequest(request_id=request_id), timeout=5.0)
        except grpc.RpcError as e:
            log.warning("release of %s on %s failed: %s", request_id, worker.address, e.code())
        with self._lock:
            worker.in_flight -= 1
            worker.free_pages += 1  # a hint until the next reservation reports the real count
            if self._line:
                self._line[0].event.set()

    def renew(self, reservation: Reservation, request_id: str) -> None:
        """Extends the lease; raises RouterError once the decode worker no longer holds it."""
        try:
            reservation.worker.decode.Renew(internal_pb2.RenewRequest(request_id=request_id, lease_s=RESERVE_LEASE_S),
                                            timeout=RENEW_EVERY_S)
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                self._health.mark_down(reservation.worker.address, f"Renew: {e.details()}")
            raise RouterError(grpc.StatusCode.UNAVAILABLE,
                              f"the decode worker {reservation.worker.address} lost the request's KV pages "
                              f"while it waited for prefill: {e.details()}") from e

    def _by_free_pages(self) -> list[WorkerHandle]:
        with self._lock:
            up = [w for w in self._workers if self._health.is_up(w.address)]
            return sorted(up, key=lambda w: (-w.free_pages, w.in_flight))

    def _try_reserve(self, request_id: str, num_tokens: int, scope: CallScope) -> tuple[Reservation | None, str]:
        """(reservation, "") on success; (None, why) when every worker that could fit it is full.

        Raises when no worker can ever fit the request, or none is reachable.
        """
        errors: dict[grpc.StatusCode, grpc.RpcError] = {}
        for worker in self._by_free_pages():
            try:
                reply = worker.decode.Reserve(internal_pb2.ReserveRequest(
                    request_id=request_id, num_tokens=num_tokens, lease_s=RESERVE_LEASE_S),
                    timeout=scope.timeout(RPC_TIMEOUT_S))
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    # The worker may have reserved just before the deadline cut the reply: undo it
                    # rather than leave the pages held until the lease expires.
                    self._release_unconfirmed(worker, request_id)
                    scope.check()  # the client's deadline or cancel: say so, not "no room"
                errors.setdefault(e.code(), e)
                if e.code() is grpc.StatusCode.UNAVAILABLE:
                    self._health.mark_down(worker.address, f"Reserve: {e.details()}")
                continue
            with self._lock:
                worker.free_pages = reply.free_pages
                worker.in_flight += 1
            data_address = resolve_data_address(reply.kv_data_address, worker.address) if reply.kv_data_address else ""
            return Reservation(worker, data_address, reply.kv_ticket), ""
        if full := errors.get(grpc.StatusCode.RESOURCE_EXHAUSTED):
            return None, full.details()
        if too_big := errors.get(grpc.StatusCode.INVALID_ARGUMENT):
            raise RouterError(grpc.StatusCode.OUT_OF_RANGE, too_big.details())
        if not errors:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no decode worker is up: {self._health.down()}")
        raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no decode worker could reserve pages: {errors}")

    def _release_unconfirmed(self, worker: WorkerHandle, request_id: str) -> None:
        """Releases a reservation whose Reserve call ended without an answer (a no-op if none was made)."""
        try:
            worker.decode.Release(internal_pb2.ReleaseRequest(request_id=request_id), timeout=5.0)
        except grpc.RpcError as e:
            log.warning("release of unconfirmed %s on %s failed: %s", request_id, worker.address, e.code())
