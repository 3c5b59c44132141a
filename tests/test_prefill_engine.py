"""The prefill engine hands each layer's KV to the sender before the first token exists."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from splitserve.models import serving
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.prefill_engine import PrefillEngine, PrefillJob
from splitserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return ModelRunner(load_model("demo", make_mesh(MeshConfig(1))), RunnerConfig(num_pages=2, max_prefill_batch=4))


def test_all_layers_are_sendable_before_the_first_token_is_known(runner):
    """The sampler's result is held back until the sender has read every layer (or 20 s pass):
    an engine that waited for the first token before starting its senders fails the asserts."""
    gate = threading.Event()
    real = runner.prefill_async

    class GatedTokens:  # what the engine waits on for the first tokens
        def __init__(self, first):
            self.first = first

        def to_host(self, params):
            seen["gate_opened_by_sender"] = gate.wait(20)
            return self.first.to_host(params)

    def gated_prefill(*args):
        first, ks, vs, lengths = real(*args)
        return GatedTokens(first), ks, vs, lengths

    seen = {"token_known_before_kv": [], "k": {}, "v": {}, "token_in_trailer": {}}

    def send_kv(job, kv):  # runs on the engine's sender threads: rows may come in any order
        k_layers, v_layers = kv.host_layers(runner.model.layout.kv_source)
        seen["token_known_before_kv"].append(job.first_token.done())
        seen["k"][job.request_id] = [np.array(x) for x in k_layers]
        seen["v"][job.request_id] = [np.array(x) for x in v_layers]
        gate.set()
        seen["token_in_trailer"][job.request_id] = job.first_token.result(timeout=60)

    runner.prefill_async = gated_prefill
    engine = PrefillEngine(runner, send_kv, max_prefill_batch=4)
    prompts = [[1, 5, 9, 200, 17, 33, 4], [1, 2, 3]]
    jobs = [PrefillJob(f"r{i}", p, SamplingParams(max_tokens=4), "decode:1") for i, p in enumerate(prompts)]
    futures = [engine.submit(job) for job in jobs]  # queued before the loop starts: one batch of two
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    try:
        tokens = [f.result(timeout=120) for f in futures]
    finally:
        engine.stop()
        runner.prefill_async = real
        thread.join(30)

    assert seen["gate_opened_by_sender"] and seen["token_known_before_kv"] == [False, False]
    # Each streamed row's KV is exactly that of the one-jit prefill of its own prompt.
    model = runner.model
    one_prefill = jax.jit(lambda p, t, l: serving.prefill(model.graphdef, p, t, l))
    for job, token in zip(jobs, tokens):
        prompt = job.prompt_ids
        logits, ks, vs = one_prefill(model.params, np.array([prompt], np.int32), np.array([len(prompt)], np.int32))
        assert int(np.argmax(np.asarray(logits)[0])) == token == seen["token_in_trailer"][job.request_id]
        got_k, got_v = seen["k"][job.request_id], seen["v"][job.request_id]
        assert len(got_k) == len(got_v) == model.config.num_layers
        for got, want in zip(got_k + got_v, ks + vs):
            np.testing.assert_allclose(got, np.asarray(want)[0, : len(prompt)], rtol=1e-5, atol=1e-5)


class SlowRunner:
    """A fake runner whose first prefill blocks until `release` is set; records every prompt run.
    First token of a prompt = its length, so results can be checked by hand."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.ran: list[list[int]] = []
        self.last_cached_tokens: list[int] = []  # as ModelRunner: no prefix cache here
        self.chunked = None  # nor chunked prefill

    def prefill_async(self, prompts, sampling, steps):
        self.ran += prompts
        self.last_cached_tokens = [0] * len(prompts)
        self.started.set()
        assert self.release.wait(30), "test never released the runner"
        return _HostTokens([len(p) for p in prompts]), [], [], None


class _HostTokens(list):
    """First tokens as prefill_async hands them over (runner.Sampled), without logprobs."""

    def to_host(self, params):
        return list(self[: len(params)]), [None] * len(params)


def _engine(runner, **kwargs):
    engine = PrefillEngine(runner, lambda job, kv: None, max_prefill_batch=4, **kwargs)
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    return engine, thread


def _job(rid, n, deadline=None):
    return PrefillJob(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4), "", deadline=deadline)


def test_a_job_whose_deadline_passes_in_the_queue_never_reaches_the_device():
    from splitserve.runtime.deadlines import DeadlinePassed

    runner = SlowRunner()
    engine, thread = _engine(runner)
    try:
        busy = engine.submit(_job("busy", 3))
        assert runner.started.wait(30)  # the engine is inside the (slow) prefill of "busy"
        late = engine.submit(_job("late", 5, deadline=time.monotonic() + 0.05))
        on_time = engine.submit(_job("on-time", 7, deadline=time.monotonic() + 60))
        time.sleep(0.1)  # "late" expires while it waits
        runner.release.set()
        assert busy.result(30) == 3 and on_time.result(30) == 7
        with pytest.raises(DeadlinePassed, match="deadline passed while it waited"):
            late.result(30)
    finally:
        runner.release.set()
        engine.stop()
        thread.join(30)
    assert [len(p) for p in runner.ran] == [3, 7]  # "late" was never run
    assert (engine.prefilled, engine.dropped_expired, engine.dropped_cancelled) == (2, 1, 0)
    assert engine.in_flight == 0


def test_a_cancelled_queued_job_never_reaches_the_device():
    runner = SlowRunner()
    engine, thread = _engine(runner)
    try:
        busy = engine.submit(_job("busy", 3))
        assert runner.started.wait(30)
        gone = engine.submit(_job("gone", 5))
        assert engine.in_flight == 2
        assert gone.cancel()  # what PrefillService's callback does when the router gives up
        runner.release.set()
        assert busy.result(30) == 3
    finally:
        runner.release.set()
        engine.stop()
        thread.join(30)
    assert [len(p) for p in runner.ran] == [3]
    assert (engine.prefilled, engine.dropped_cancelled) == (1, 1)


def test_a_full_queue_refuses_at_once_and_names_its_limit():
    from splitserve.runtime.prefill_engine import PrefillQueueFull

    runner = SlowRunner()
    engine, thread = _engine(runner, max_queued=2)
    try:
        engine.submit(_job("busy", 1))
        assert runner.started.wait(30)  # taken off the queue: the queue is empty again
        queued = [engine.submit(_job(f"q{i}", 2)) for i in range(2)]
        start = time.monotonic()
        with pytest.raises(PrefillQueueFull, match="the limit is 2"):
            engine.submit(_job("one-too-many", 2))
        assert time.monotonic() - start < 0.5  # refused, not waited
        runner.release.set()
        assert [f.result(30) for f in queued] == [2, 2]
        assert engine.submit(_job("room-again", 4)).result(30) == 4
    finally:
        runner.release.set()
        engine.stop()
        thread.join(30)
