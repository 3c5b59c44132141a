"""Decode-worker scheduler: reservations, leases, admission, frees. Plain Python, no JAX.

A request's life on a decode worker:

    reserve() ── pages held under a lease ──┬─ kv_arrived()  ─┐
                                            └─ stream_opened() ┴─► ready ─► running ─► finished
    lease expires before both arrive ─► pages freed, later KV or stream for it is refused
    renew() while the prompt waits for prefill ─► the lease runs on from now

Each step, schedule() admits ready requests (their KV gets inserted into their pages) up
to max_batch and lists the running ones to decode. finish() and release() free pages at
once, so a cancelled request's pages are back before the next step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from splitserve.runtime.page_allocator import PageAllocator, pages_needed
from splitserve.runtime.request import FinishReason
from splitserve.runtime.sampling_params import SamplingParams


class UnknownRequest(KeyError):
    """No reservation (never made, expired, released or finished)."""


def _prompt_mismatch(request_id: str, prompt_ids: int, kv_tokens: int) -> str:
    return f"request {request_id!r}: a prompt of {prompt_ids} ids, KV of {kv_tokens} tokens"


@dataclasses.dataclass
class DecodeSlot:
    request_id: str
    pages: list[int]
    reserved_tokens: int
    lease_deadline: float
    kv: Any = None  # host KV from the transfer (opaque here); None again once inserted
    kv_claimed: bool = False  # a transfer began (claim_kv): a second one is refused, not merged
    prompt_len: int = 0
    params: SamplingParams | None = None
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # only for a repetition penalty
    output_ids: list[int] = dataclasses.field(default_factory=list)
    running: bool = False
    finish_reason: FinishReason | None = None

    @property
    def ready(self) -> bool:
        return self.kv is not None and self.params is not None and not self.running

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    admit: list[DecodeSlot]  # insert their KV, then decode them with the others
    decode: list[DecodeSlot]  # every running slot, admitted ones included

    @property
    def empty(self) -> bool:
        return not self.decode


class DecodeScheduler:
    def __init__(self, allocator: PageAllocator, *, page_size: int, max_batch: int,
                 max_tokens_per_seq: int | None = None, clock: Callable[[], float] = time.monotonic):
        """`max_tokens_per_seq`: the model's context (max_model_len); None: only the pool bounds a request."""
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch = max_batch
        self.max_tokens_per_seq = max_tokens_per_seq
        self.clock = clock
        self.slots: dict[str, DecodeSlot] = {}

    # -- arrivals -------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int, lease_s: float) -> DecodeSlot:
        if request_id in self.slots:
            raise ValueError(f"request {request_id!r} already has a reservation")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if self.max_tokens_per_seq is not None and num_tokens > self.max_tokens_per_seq:
            raise ValueError(f"{num_tokens} tokens exceed the model's context of {self.max_tokens_per_seq}")
        needed = pages_needed(num_tokens, self.page_size)
        if needed > self.allocator.capacity:
            raise ValueError(f"{num_tokens} tokens need {needed} KV pages; this decode worker's pool holds "
                             f"{self.allocator.capacity} at most")
        pages = self.allocator.allocate(needed)  # may raise OutOfPages
        slot = DecodeSlot(request_id, pages, num_tokens, self.clock() + lease_s)
        self.slots[request_id] = slot
        return slot

    def renew(self, request_id: str, lease_s: float) -> None:
        """The lease runs `lease_s` from now (never shorter than it was). Raises UnknownRequest
        once the reservation is gone."""
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        slot = self._slot(request_id)
        slot.lease_deadline = max(slot.lease_deadline, self.clock() + lease_s)

    def kv_arrived(self, request_id: str, kv: Any, prompt_len: int, first_token: int) -> None:
        slot = self._slot(request_id)
        if slot.kv is not None or slot.running:  # running: inserted, its host copy gone
            raise ValueError(f"request {request_id!r} already has its KV")
        if prompt_len + 1 > slot.reserved_tokens:
            raise ValueError(f"KV of {prompt_len} tokens does not fit the reservation of {slot.reserved_tokens}")
        if slot.prompt_ids and len(slot.prompt_ids) != prompt_len:
            raise ValueError(_prompt_mismatch(request_id, len(slot.prompt_ids), prompt_len))
        slot.kv, slot.prompt_len, slot.output_ids = kv, prompt_len, [first_token]

    def claim_kv(self, request_id: str) -> None:
        """A transfer for the request begins (its header came). Raises UnknownRequest without a
        reservation, ValueError if another transfer claimed it before: that one owns the
        reservation, and a duplicate's failure must not drop it."""
        slot = self._slot(request_id)
        if slot.kv_claimed or slot.kv is not None or slot.running:
            raise ValueError(f"request {request_id!r} already has its KV, or another transfer is bringing it")
        slot.kv_claimed = True

    def stream_opened(self, request_id: str, params: SamplingParams, prompt_ids: list[int] = ()) -> None:
        """`prompt_ids`: needed with a repetition penalty (the decode step penalises them)."""
        slot = self._slot(request_id)
        if slot.params is not None:
            raise ValueError(f"request {request_id!r} is already streaming")
        if params.max_tokens + slot.prompt_len > slot.reserved_tokens and slot.kv is not None:
            raise ValueError(f"request {request_id!r}: max_tokens exceeds the reservation")
        if params.repetition_penalty != 1.0:
            if not prompt_ids:
                raise ValueError(f"request {request_id!r}: a repetition penalty needs the prompt's ids")
            if slot.kv is not None and len(prompt_ids) != slot.prompt_len:
                raise ValueError(_prompt_mismatch(request_id, len(prompt_ids), slot.prompt_len))
            slot.prompt_ids = list(prompt_ids)
        slot.params = params

    def _slot(self, request_id: str) -> DecodeSlot:
        slot = self.slots.get(request_id)
        if slot is None:
            raise UnknownRequest(f"request {request_id!r} has no reservation (expired or released?)")
        return slot

    # -- the step -------------------------------------------------------------------------
    def expire_leases(self) -> list[str]:
        """Frees reservations whose KV or stream did not come in time. A ready request waiting for
        a place in the batch has both: its lease no longer applies."""
        now = self.clock()
        expired = [s.request_id for s in self.slots.values()
                   if not s.running and not s.ready and now > s.lease_deadline]
        for request_id in expired:
            self.release(request_id)
        return expired

    def schedule(self) -> DecodePlan:
        running = [s for s in self.slots.values() if s.running]
        admit = []
        for slot in self.slots.values():
            if len(running) + len(admit) >= self.max_batch:
                break
            if slot.ready:
                admit.append(slot)
        for slot in admit:
            slot.running = True
        return DecodePlan(admit=admit, decode=running + admit)

    def next_lease_deadline(self) -> float | None:
        waiting = [s.lease_deadline for s in self.slots.values() if not s.running]
        return min(waiting) if waiting else None

    # -- departures -----------------------------------------------------------------------
    def finish(self, slot: DecodeSlot, reason: FinishReason) -> None:
        slot.finish_reason = reason
        self.release(slot.request_id)

    def release(self, request_id: str) -> bool:
        slot = self.slots.pop(request_id, None)
        if slot is None:
            return False
        self.allocator.free(slot.pages)
        slot.pages = []
        slot.kv = None
        return True

    @property
    def num_running(self) -> int:
        return sum(s.running for s in self.slots.values())

    @property
    def num_waiting(self) -> int:
        return len(self.slots) - self.num_running
