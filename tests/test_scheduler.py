"""Scheduler, page allocator and stop rules: plain Python, no model."""

import pytest

from splitserve.runtime.page_allocator import OutOfPages, PageAllocator, pages_needed
from splitserve.runtime.request import FinishReason, Request
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.scheduler import Scheduler, SchedulerConfig
from splitserve.runtime.stop_rules import (find_stop_string, finish_reason_after_token, looks_for_stop_strings,
                                           stop_reason)


def req(rid, prompt_len, max_tokens=4, **kw):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def test_allocator_never_hands_out_the_sink_and_detects_double_free():
    alloc = PageAllocator(5)
    pages = alloc.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and alloc.free_count == 0
    with pytest.raises(OutOfPages):
        alloc.allocate(1)
    alloc.free(pages[:2])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([0])
    assert alloc.free_count == 2


def test_pages_needed_rounds_up():
    assert [pages_needed(n, 16) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]


def test_admission_respects_batch_pages_and_fifo():
    sched = Scheduler(SchedulerConfig(max_batch=2, page_size=4, max_model_len=64), PageAllocator(7))
    for rid, n in (("a", 10), ("b", 10), ("c", 2)):
        sched.add(req(rid, n, max_tokens=2))  # a, b: 3 pages each; c: 1 page
    plan = sched.schedule()
    assert [r.request_id for r in plan.prefill] == ["a", "b"] and plan.decode == []
    assert sched.allocator.free_count == 0
    plan = sched.schedule()  # batch is full: a and b decode, c waits
    assert [r.request_id for r in plan.decode] == ["a", "b"] and plan.prefill == []
    sched.finish(sched.running["a"], FinishReason.LENGTH)
    assert sched.allocator.free_count == 3
    plan = sched.schedule()
    assert [r.request_id for r in plan.prefill] == ["c"]
    assert [r.request_id for r in plan.decode] == ["b"]


def test_waiting_request_blocks_later_ones_when_pages_are_short():
    sched = Scheduler(SchedulerConfig(max_batch=8, page_size=4, max_model_len=64), PageAllocator(5))
    sched.add(req("big", 12, max_tokens=4))  # 4 pages: takes the whole pool
    sched.add(req("huge", 12, max_tokens=4))
    sched.add(req("small", 1, max_tokens=1))
    assert [r.request_id for r in sched.schedule().prefill] == ["big"]
    assert sched.schedule().prefill == []  # "small" must not overtake "huge"


def test_prefill_token_budget_splits_prefills():
    sched = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=20, page_size=4, max_model_len=64),
                      PageAllocator(64))
    for rid in "abc":
        sched.add(req(rid, 10))
    assert len(sched.schedule().prefill) == 2
    assert len(sched.schedule().prefill) == 1


def test_requests_that_can_never_fit_are_rejected():
    sched = Scheduler(SchedulerConfig(page_size=4, max_model_len=32), PageAllocator(4))
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        sched.add(req("long", 30, max_tokens=3))
    with pytest.raises(ValueError, match="KV pages"):
        sched.add(req("big", 16, max_tokens=4))


def test_abort_frees_pages_wherever_the_request_is():
    sched = Scheduler(SchedulerConfig(max_batch=1, page_size=4, max_model_len=64), PageAllocator(9))
    sched.add(req("run", 4))
    sched.add(req("wait", 4))
    sched.schedule()
    assert sched.abort("wait").finish_reason is FinishReason.ABORT
    assert sched.abort("run").finish_reason is FinishReason.ABORT
    assert sched.allocator.free_count == 8 and not sched.has_work()
    assert sched.abort("unknown") is None


def test_finish_reasons():
    r = req("r", 3, max_tokens=3, stop_token_ids=(9,))
    r.output_ids = [5]
    assert finish_reason_after_token(r, eos_token_ids=(2,)) is None
    r.output_ids = [5, 2]
    assert finish_reason_after_token(r, eos_token_ids=(2,)) is FinishReason.STOP
    r.output_ids = [5, 9]
    assert finish_reason_after_token(r, eos_token_ids=(2,)) is FinishReason.STOP
    r.output_ids = [5, 6, 7]
    assert finish_reason_after_token(r, eos_token_ids=(2,)) is FinishReason.LENGTH
    ignoring = req("i", 3, max_tokens=3, ignore_eos=True)
    ignoring.output_ids = [2]
    assert finish_reason_after_token(ignoring, eos_token_ids=(2,)) is None


def test_stop_reason_names_the_stop_string_or_stop_id_and_not_eos():
    """As vLLM's: EOS (unless ignore_eos) is checked before the stop ids and gives no stop_reason."""
    r = req("r", 3, max_tokens=8, stop_token_ids=(9, 2))
    r.output_ids = [5, 9]
    assert stop_reason(r, (2,), None) == 9
    assert stop_reason(r, (2,), "ab") == "ab"  # a stop string that ended the text
    r.output_ids = [5, 2]
    assert stop_reason(r, (2,), None) is None  # EOS, though also a stop id
    ignoring = req("i", 3, max_tokens=8, ignore_eos=True, stop_token_ids=(2,))
    ignoring.output_ids = [2]
    assert stop_reason(ignoring, (2,), None) == 2


def test_nothing_but_max_tokens_ends_a_request_before_min_tokens():
    r = req("m", 3, max_tokens=4, min_tokens=3, stop_token_ids=(9,))
    for outputs, reason in (([2], None), ([5, 9], None), ([5, 6, 2], FinishReason.STOP), ([5, 6, 9], FinishReason.STOP),
                            ([5, 6, 7], None), ([5, 6, 7, 8], FinishReason.LENGTH)):
        r.output_ids = outputs
        assert finish_reason_after_token(r, eos_token_ids=(2,)) is reason, outputs
        assert looks_for_stop_strings(r) is (len(outputs) > 3)  # as vLLM V1: after the min_tokens-th token


def test_find_stop_string_finds_earliest_and_only_new_ones():
    assert find_stop_string("hello world", ("wor", "o w"), new_chars=5) == 4
    assert find_stop_string("hello world", ("hello",), new_chars=1) is None  # completed long ago
    assert find_stop_string("abc", (), new_chars=3) is None
    # Each stop string has its own window: "AB" ended before the newest character, so it is not
    # found again (a window sized by "WXYZ" found it); a new "AB" is.
    assert find_stop_string("ABC", ("AB", "WXYZ"), new_chars=1) is None
    assert find_stop_string("ABCAB", ("AB", "WXYZ"), new_chars=1) == 3
