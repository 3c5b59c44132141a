"""n > 1 (runtime/parallel_sampling.py) on a stand-in router: how sequences start, interleave,
fail together and end. The real router and workers are in tests/test_client.py."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from splitserve.runtime.client_types import Chunk, SequencesBuilder, SplitserveError
from splitserve.runtime.deadlines import CallCancelled, CallScope
from splitserve.runtime.parallel_sampling import sequences
from splitserve.runtime.router import RouterError, RouterEvent
from splitserve.runtime.sampling_params import SamplingParams


class StandInRouter:
    """Each sequence yields its seed as tokens; the one whose seed is `failing` fails after one event;
    the others run until the scope is cancelled. Records which sequences released what they held."""

    def __init__(self, failing: int | None = None, tokens: int | None = None):
        self.failing, self.tokens = failing, tokens
        self.released: list[int] = []
        self.lock = threading.Lock()

    def generate(self, prompt_ids, params, request_id, scope, on_prefill):
        assert params.n == 1
        try:
            for i in range(self.tokens or 10**9):
                if scope.cancelled:
                    raise CallCancelled("cancelled")
                last = self.tokens is not None and i == self.tokens - 1
                yield RouterEvent([params.seed], "", "length" if last else "")
                if params.seed == self.failing:
                    raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"sequence with seed {params.seed} failed")
                time.sleep(0.005)
        finally:
            time.sleep(0.05)  # releasing pages takes a while: the call must wait for it
            with self.lock:
                self.released.append(params.seed)


def test_sequences_take_seed_plus_index_and_all_end():
    router = StandInRouter(tokens=3)
    got = list(sequences(router, [1, 2], SamplingParams(n=4, seed=2**32 - 2), "r", CallScope()))
    seeds = {0: 2**32 - 2, 1: 2**32 - 1, 2: 0, 3: 1}  # seed + index, wrapped at 2**32
    assert sorted(got, key=lambda x: x[0]) == sorted(
        [(i, RouterEvent([seeds[i]], "", "length" if k == 2 else "")) for i in range(4) for k in range(3)],
        key=lambda x: x[0])
    assert sorted(router.released) == sorted(seeds.values())


def test_the_first_failure_is_the_calls_and_every_other_sequence_has_ended_when_it_is_raised():
    router = StandInRouter(failing=11)
    scope = CallScope()
    with pytest.raises(RouterError, match="seed 11 failed"):
        list(sequences(router, [1], SamplingParams(n=3, seed=10), "r", scope))
    assert scope.cancelled and sorted(router.released) == [10, 11, 12]


def test_a_reader_that_stops_early_cancels_and_waits_for_every_sequence():
    router = StandInRouter()
    scope = CallScope()
    stream = sequences(router, [1], SamplingParams(n=3, seed=0), "r", scope)
    seen = {next(stream)[0] for _ in range(6)}
    stream.close()
    assert scope.cancelled and sorted(router.released) == [0, 1, 2] and seen <= {0, 1, 2}


def test_sequences_builder_puts_each_chunk_in_its_sequence_and_refuses_a_stray_index():
    builder = SequencesBuilder(0.0, 2)
    builder.add(Chunk([5], "a", None, [1, 2], index=1), 1.0)
    builder.add(Chunk([6], "b", "length", [], index=0), 2.0)
    builder.add(Chunk([7], "c", "stop", [], stop_reason=7, index=1), 3.0)
    first, second = builder.build(4.0)
    assert (first.token_ids, first.text, first.finish_reason, first.latency_s) == ([6], "b", "length", 2.0)
    assert (second.token_ids, second.stop_reason, second.latency_s, second.ttft_s) == ([5, 7], 7, 3.0, 1.0)
    assert first.prompt_token_ids == second.prompt_token_ids == [1, 2]
    with pytest.raises(SplitserveError, match="the router sent sequence 2 of 2"):
        builder.add(Chunk([1], "", None, [], index=2), 5.0)
