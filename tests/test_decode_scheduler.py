"""Decode-worker scheduler: reservations, leases, admission, frees. No model."""

import pytest

from splitserve.runtime.decode_scheduler import DecodeScheduler, UnknownRequest
from splitserve.runtime.page_allocator import OutOfPages, PageAllocator
from splitserve.runtime.request import FinishReason
from splitserve.runtime.sampling_params import SamplingParams


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(pages=17, max_batch=4):
    clock = FakeClock()
    return DecodeScheduler(PageAllocator(pages), page_size=4, max_batch=max_batch, clock=clock), clock


def test_admitted_only_when_kv_and_stream_are_both_there():
    sched, _ = make()
    sched.reserve("a", num_tokens=10, lease_s=5)
    assert sched.allocator.free_count == 16 - 3
    assert sched.schedule().empty
    sched.kv_arrived("a", kv="KV", prompt_len=6, first_token=42)
    assert sched.schedule().empty
    sched.stream_opened("a", SamplingParams(max_tokens=4))
    plan = sched.schedule()
    assert [s.request_id for s in plan.admit] == ["a"] and [s.request_id for s in plan.decode] == ["a"]
    slot = plan.admit[0]
    assert slot.output_ids == [42] and slot.num_tokens == 7
    plan = sched.schedule()
    assert plan.admit == [] and [s.request_id for s in plan.decode] == ["a"]


def test_stream_may_come_before_kv():
    sched, _ = make()
    sched.reserve("a", 10, 5)
    sched.stream_opened("a", SamplingParams(max_tokens=4))
    sched.kv_arrived("a", "KV", 6, 1)
    assert [s.request_id for s in sched.schedule().admit] == ["a"]


def test_lease_expiry_frees_pages_and_refuses_late_kv():
    sched, clock = make()
    sched.reserve("late", 10, lease_s=2)
    sched.reserve("ok", 10, lease_s=2)
    sched.kv_arrived("ok", "KV", 6, 1)
    sched.stream_opened("ok", SamplingParams(max_tokens=4))
    sched.schedule()  # "ok" is running: its lease no longer matters
    clock.now += 3
    assert sched.expire_leases() == ["late"]
    assert sched.allocator.free_count == 16 - 3
    with pytest.raises(UnknownRequest):
        sched.kv_arrived("late", "KV", 6, 1)
    assert sched.expire_leases() == []


def test_batch_limit_and_out_of_pages():
    sched, _ = make(pages=9, max_batch=1)  # 8 usable pages of 4 tokens
    sched.reserve("a", 16, 5)
    sched.reserve("b", 16, 5)
    with pytest.raises(OutOfPages):
        sched.reserve("c", 1, 5)
    for rid in ("a", "b"):
        sched.kv_arrived(rid, "KV", 4, 1)
        sched.stream_opened(rid, SamplingParams(max_tokens=4))
    assert [s.request_id for s in sched.schedule().admit] == ["a"]
    assert sched.schedule().admit == []  # b waits for a place in the batch
    sched.finish(sched.slots["a"], FinishReason.LENGTH)
    assert [s.request_id for s in sched.schedule().admit] == ["b"]



def test_renewing_a_lease_keeps_the_reservation_past_its_first_deadline():
    sched, clock = make()
    sched.reserve("queued", 10, lease_s=2)
    sched.reserve("forgotten", 10, lease_s=2)
    expired = []
    for _ in range(3):  # the router renews while the prompt waits for a prefill worker
        clock.now += 1.5
        sched.renew("queued", lease_s=2)
        expired += sched.expire_leases()
    assert expired == ["forgotten"] and clock.now > 104  # twice its first lease
    sched.renew("queued", lease_s=0.5)  # a shorter renewal never cuts the lease
    clock.now += 1.9
    assert sched.expire_leases() == []
    sched.kv_arrived("queued", "KV", 6, 1)  # still reserved: its KV is taken
    clock.now += 5
    assert sched.expire_leases() == ["queued"]  # renewals stopped (a router gone): the pages come back
    assert sched.allocator.free_count == 16
    with pytest.raises(UnknownRequest):
        sched.renew("queued", lease_s=2)
    sched.reserve("x", 10, lease_s=2)
    with pytest.raises(ValueError, match="lease_s"):
        sched.renew("x", lease_s=0)


def test_release_frees_at_once_and_is_idempotent():
    sched, _ = make()
    sched.reserve("a", 10, 5)
    assert sched.release("a") is True
    assert sched.release("a") is False
    assert sched.allocator.free_count == sched.allocator.capacity


def test_bad_calls_are_refused():
    sched, _ = make()
    sched.reserve("a", 8, 5)
    with pytest.raises(ValueError, match="already has a reservation"):
        sched.reserve("a", 8, 5)
    with pytest.raises(ValueError, match="does not fit"):
        sched.kv_arrived("a", "KV", prompt_len=8, first_token=1)
    sched.kv_arrived("a", "KV", 4, 1)
    with pytest.raises(ValueError, match="already has its KV"):
        sched.kv_arrived("a", "KV", 4, 1)
    with pytest.raises(UnknownRequest):
        sched.stream_opened("nope", SamplingParams())


def test_only_one_transfer_may_claim_a_request_and_a_running_one_takes_no_kv():
    sched, _ = make()
    sched.reserve("a", 8, 5)
    with pytest.raises(UnknownRequest):
        sched.claim_kv("nope")
    sched.claim_kv("a")
    with pytest.raises(ValueError, match="another transfer"):
        sched.claim_kv("a")
    sched.kv_arrived("a", "KV", 4, 1)
    sched.stream_opened("a", SamplingParams(max_tokens=3))
    assert [s.request_id for s in sched.schedule().admit] == ["a"]
    sched.slots["a"].kv = None  # inserted: the engine drops the host copy
    with pytest.raises(ValueError, match="already has its KV"):  # it used to reset the running request
        sched.kv_arrived("a", "KV2", 4, 7)
    with pytest.raises(ValueError):
        sched.claim_kv("a")
    assert sched.slots["a"].output_ids == [1]


def test_a_request_larger_than_the_pool_is_refused_not_queued():
    sched, _ = make(pages=5)  # 4 usable pages of 4 tokens
    with pytest.raises(ValueError, match="holds 4 at most"):
        sched.reserve("huge", num_tokens=17, lease_s=5)
    assert sched.allocator.free_count == 4


def test_a_ready_request_waiting_for_the_batch_outlives_its_lease():
    """The lease covers waiting for the KV and the stream: once both are in, a request queued
    behind a full batch keeps its pages however long the running ones take."""
    sched, clock = make(max_batch=1)
    for rid in ("a", "b"):
        sched.reserve(rid, 10, lease_s=5)
        sched.kv_arrived(rid, "KV", 6, 1)
        sched.stream_opened(rid, SamplingParams(max_tokens=4))
    assert [s.request_id for s in sched.schedule().admit] == ["a"]
    sched.reserve("never-sent", 10, lease_s=5)
    clock.now += 10
    assert sched.expire_leases() == ["never-sent"]
    sched.finish(sched.slots["a"], FinishReason.LENGTH)
    assert [s.request_id for s in sched.schedule().admit] == ["b"]


def test_a_reservation_beyond_the_models_context_is_refused():
    """A pool larger than one sequence's page table must not admit a request the decode step
    cannot address (it would fail the step for the whole batch)."""
    sched = DecodeScheduler(PageAllocator(65), page_size=4, max_batch=4, max_tokens_per_seq=32, clock=FakeClock())
    sched.reserve("fits", num_tokens=32, lease_s=5)
    with pytest.raises(ValueError, match="exceed the model's context of 32"):
        sched.reserve("long", num_tokens=33, lease_s=5)
    assert "long" not in sched.slots and sched.allocator.free_count == 64 - 8


def test_a_repetition_penalty_needs_prompt_ids_that_match_the_kv_whichever_comes_first():
    rep = SamplingParams(max_tokens=4, repetition_penalty=1.2)
    sched, _ = make()
    for request_id in ("kv-first", "stream-first", "ok", "none"):
        sched.reserve(request_id, num_tokens=10, lease_s=5)
    with pytest.raises(ValueError, match="a repetition penalty needs the prompt's ids"):
        sched.stream_opened("none", rep)
    sched.kv_arrived("kv-first", kv="KV", prompt_len=6, first_token=1)
    with pytest.raises(ValueError, match="'kv-first': a prompt of 5 ids, KV of 6 tokens"):
        sched.stream_opened("kv-first", rep, [1, 2, 3, 4, 5])
    sched.stream_opened("stream-first", rep, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="'stream-first': a prompt of 5 ids, KV of 6 tokens"):
        sched.kv_arrived("stream-first", kv="KV", prompt_len=6, first_token=1)
    sched.stream_opened("ok", rep, [1, 2, 3, 4, 5, 6])
    sched.kv_arrived("ok", kv="KV", prompt_len=6, first_token=1)
    plan = sched.schedule()
    assert [s.request_id for s in plan.admit] == ["ok"] and plan.admit[0].prompt_ids == [1, 2, 3, 4, 5, 6]
    sched.stream_opened("kv-first", SamplingParams(max_tokens=4), [9])  # no penalty: the ids are not kept
    assert sched.slots["kv-first"].prompt_ids == []
