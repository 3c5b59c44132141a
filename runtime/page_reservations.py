"""Decode pages for the router's requests (step 1 of runtime/router.py).

A request reserves pages for prompt + max_tokens on the decode worker with most free pages,
before its prefill starts, so the KV that prefill sends always has somewhere to land. While every
worker is full, requests wait here (at most MAX_WAITING_FOR_PAGES of them, each at most
WAIT_FOR_PAGES_S), woken whenever a reservation is released.

A reservation holds its pages for a lease of RESERVE_LEASE_S, so that pages whose router died are
freed; the router renews it every RENEW_EVERY_S while the prompt waits in a prefill queue, which
may take longer than a lease when many long prompts arrive at once.
"""

from __future__ import annotations

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
MAX_WAITING_FOR_PAGES = 512  # requests queued for decode pages; past it, RESOURCE_EXHAUSTED at once
WAIT_FOR_PAGES_S = 120.0


@dataclasses.dataclass(frozen=True)
class Reservation:
    """One attempt's pages on a decode worker, and where its KV goes: the worker's KV data socket
    and the one-time ticket for it, or (both empty) its gRPC TransferKV."""

    worker: WorkerHandle
    kv_data_address: str = ""
    kv_ticket: bytes = dataclasses.field(default=b"", repr=False)


class PageReservations:
    """`lock` guards the workers' `free_pages` and `in_flight` (the router takes it too)."""

    def __init__(self, decode_workers: list[WorkerHandle], health: WorkerHealth, lock: threading.Lock):
        self._workers = decode_workers
        self._health = health
        self._lock = lock
        self._room = threading.Condition(lock)  # notified whenever a reservation is released
        self._waiting = 0

    def reserve(self, request_id: str, num_tokens: int, scope: CallScope) -> Reservation:
        """Reserves on the decode worker with most free pages; queues (bounded) while all are full."""
        deadline = time.monotonic() + WAIT_FOR_PAGES_S
        waiting = False
        try:
            while True:
                scope.check()  # cancelled or past its deadline: stop waiting now
                reservation, full = self._try_reserve(request_id, num_tokens, scope)
                if reservation is not None:
                    return reservation
                with self._room:
                    if not waiting:
                        if self._waiting >= MAX_WAITING_FOR_PAGES:
                            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              f"{self._waiting} requests already wait for KV pages")
                        self._waiting += 1
                        waiting = True
                    if time.monotonic() > deadline:
                        raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          f"no decode worker had room within {WAIT_FOR_PAGES_S:.0f}s: {full}")
                    self._room.wait(0.05)
        finally:
            if waiting:
                with self._room:
                    self._waiting -= 1

    def release(self, worker: WorkerHandle, request_id: str) -> None:
        try:
            worker.decode.Release(internal_pb2.ReleaseRequest(request_id=request_id), timeout=5.0)
        except grpc.RpcError as e:
            log.warning("release of %s on %s failed: %s", request_id, worker.address, e.code())
        with self._room:
            worker.in_flight -= 1
            worker.free_pages += 1  # a hint until the next reservation reports the real count
            self._room.notify_all()

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
