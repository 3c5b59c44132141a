"""The router's line for decode pages (runtime/page_reservations.py), against fake decode workers:
arrival order, one asker at a time, cancels and deadlines leave the line at once."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from splitserve.protos import internal_pb2
from splitserve.runtime import page_reservations
from splitserve.runtime.deadlines import CallCancelled, CallScope, DeadlinePassed
from splitserve.runtime.page_reservations import PageReservations
from splitserve.runtime.router import WorkerHandle
from splitserve.runtime.worker_health import WorkerHealth


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class FakeDecode:
    """A decode worker's Reserve and Release over `slots` requests' worth of pages."""

    def __init__(self, slots: int):
        self.free = slots
        self.held: set[str] = set()
        self.reserve_calls = 0
        self._lock = threading.Lock()

    def Reserve(self, request, timeout=None):
        with self._lock:
            self.reserve_calls += 1
            if not self.free:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "0 free pages")
            self.free -= 1
            self.held.add(request.request_id)
            return internal_pb2.ReserveResponse(free_pages=self.free)

    def Release(self, request, timeout=None):
        with self._lock:
            if request.request_id in self.held:
                self.held.remove(request.request_id)
                self.free += 1
        return internal_pb2.ReleaseResponse()


def pages_over(slots: int) -> tuple[PageReservations, FakeDecode]:
    decode = FakeDecode(slots)
    worker = WorkerHandle("127.0.0.1:1", "decode", prefill=None, decode=decode)
    return PageReservations([worker], WorkerHealth([worker.address], channels=None), threading.Lock()), decode


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class InLine(threading.Thread):
    """reserve() on a thread of its own; `outcome` is the Reservation or the exception."""

    def __init__(self, pages: PageReservations, request_id: str, scope: CallScope | None = None, on_pages=None):
        super().__init__(daemon=True)
        self.pages, self.request_id, self.scope, self.on_pages = pages, request_id, scope or CallScope(), on_pages
        self.outcome = None
        self.ended_at = None

    def run(self):
        try:
            self.outcome = self.pages.reserve(self.request_id, 8, self.scope)
            if self.on_pages:
                self.on_pages(self)
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.outcome = e
        self.ended_at = time.monotonic()


def line_up(pages: PageReservations, request_ids, scopes: dict | None = None, on_pages=None) -> list[InLine]:
    """Starts one waiter per id, each only once the one before is in line."""
    waiters = []
    for request_id in request_ids:
        waiters.append(InLine(pages, request_id, (scopes or {}).get(request_id), on_pages))
        waiters[-1].start()
        wait_until(lambda: pages.waiting == len(waiters), 5, f"{request_id} in line")
    return waiters


def test_waiters_get_pages_in_arrival_order():
    pages, decode = pages_over(slots=1)
    holder = pages.reserve("holder", 8, CallScope())
    served: list[str] = []

    def serve_and_leave(waiter: InLine) -> None:  # each request holds the slot, then ends
        served.append(waiter.request_id)
        pages.release(waiter.outcome.worker, waiter.request_id)

    order = [f"r{i}" for i in range(6)]
    waiters = line_up(pages, order, on_pages=serve_and_leave)
    pages.release(holder.worker, "holder")
    for waiter in waiters:
        waiter.join(5)
    assert served == order
    assert pages.waiting == 0 and decode.free == 1 and not decode.held


def test_only_the_first_in_line_asks_the_workers():
    """50 requests wait on a full worker for a second: the workers are asked about once each
    HEAD_RETRY_S, not once per waiter per poll (before: ~1000 Reserve calls in that second)."""
    pages, decode = pages_over(slots=1)
    holder = pages.reserve("holder", 8, CallScope())
    scopes = [CallScope() for _ in range(50)]
    waiters = [InLine(pages, f"r{i}", scope) for i, scope in enumerate(scopes)]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: pages.waiting == 50, 5, "50 in line")
    before = decode.reserve_calls
    time.sleep(1.0)
    asked = decode.reserve_calls - before
    assert asked <= 1 / page_reservations.HEAD_RETRY_S + 2, f"{asked} Reserve calls in 1 s"
    pages.release(holder.worker, "holder")
    wait_until(lambda: waiters[0].outcome is not None, 2, "the first in line served after the release")
    assert not isinstance(waiters[0].outcome, Exception)
    for scope in scopes[1:]:
        scope.cancel()
    for waiter in waiters:
        waiter.join(5)
    assert all(isinstance(w.outcome, CallCancelled) for w in waiters[1:])
    assert pages.waiting == 0


def test_a_release_with_room_for_several_serves_them_one_after_another_at_once():
    pages, decode = pages_over(slots=3)
    holders = [pages.reserve(f"holder{i}", 8, CallScope()) for i in range(3)]
    waiters = line_up(pages, ["a", "b", "c"])
    for i, holder in enumerate(holders):
        pages.release(holder.worker, f"holder{i}")
    released = time.monotonic()
    for waiter in waiters:
        waiter.join(5)
    assert all(not isinstance(w.outcome, Exception) for w in waiters)
    # Each took its turn as soon as the one before had its pages, not at the next retry.
    assert max(w.ended_at for w in waiters) - released < page_reservations.HEAD_RETRY_S
    assert decode.held == {"a", "b", "c"}


@pytest.mark.parametrize("position", ["first", "behind"])
def test_a_cancelled_waiter_leaves_the_line_at_once_and_the_next_moves_up(position):
    pages, decode = pages_over(slots=1)
    holder = pages.reserve("holder", 8, CallScope())
    scopes = {"a": CallScope(), "b": CallScope(), "c": CallScope()}
    a, b, c = line_up(pages, "abc", scopes)
    gone = b if position == "behind" else a
    cancelled_at = time.monotonic()
    scopes[gone.request_id].cancel()
    gone.join(5)
    assert isinstance(gone.outcome, CallCancelled)
    assert gone.ended_at - cancelled_at < 0.2
    assert pages.waiting == 2
    pages.release(holder.worker, "holder")
    first_left = b if gone is a else a
    wait_until(lambda: first_left.request_id in decode.held, 2, "the next in line served")
    assert "holder" not in decode.held and gone.request_id not in decode.held


def test_a_waiter_behind_others_leaves_when_its_deadline_passes():
    pages, _ = pages_over(slots=1)
    pages.reserve("holder", 8, CallScope())
    (first,) = line_up(pages, ["first"])
    late = InLine(pages, "late", CallScope(deadline=time.monotonic() + 0.3))
    late.start()
    late.join(5)
    assert isinstance(late.outcome, DeadlinePassed)
    assert late.ended_at - (late.scope.deadline) < 0.2  # not at the next second's look
    assert pages.waiting == 1 and first.outcome is None
