"""Chunked prefill: a prompt prefilled in chunks gives the first token, logprobs and every layer's
K/V of a whole prefill (demo, a transformers-saved GQA checkpoint on tp=2, after a prefix cache
hit); the prefill engine runs short prompts and other device turns between a long prompt's chunks.
(Served through a stack, it meets transformers and the unchunked colocated mode: test_disaggregated.)"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.chunked_prefill import ChunkedPrefill
from splitserve.runtime.device_turns import DeviceTurns
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.prefill_engine import PrefillEngine, PrefillJob
from splitserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", make_mesh(MeshConfig(1)))


def _runner(model, chunk_tokens=0, prefix_pages=0):
    return ModelRunner(model, RunnerConfig(num_pages=2, max_batch=4, max_prefill_batch=4, decodes=False,
                                           prefill_chunk_tokens=chunk_tokens, prefix_cache_pages=prefix_pages))


def _chunked(runner, prompt, params):
    """Runs every chunk; returns ((first token, logprobs), ks, vs, cached tokens, chunks run)."""
    steps, chunks = runner.chunked.run(prompt, params, 0), 1
    while True:
        try:
            next(steps)
            chunks += 1
        except StopIteration as done:
            first, ks, vs, cached = done.value
            return first.to_host([params]), ks, vs, cached, chunks


def _assert_same(chunked_runner, whole_runner, prompt, params, tolerance=2e-5):
    (tokens, logprobs), ks, vs, cached, chunks = _chunked(chunked_runner, prompt, params)
    (want_tokens, want_logprobs, _), want_ks, want_vs, _ = whole_runner.prefill_sampled([prompt], [params], [0])
    assert tokens == want_tokens
    if params.logprobs is not None:
        assert [t for t, _ in logprobs[0].top] == [t for t, _ in want_logprobs[0].top]
        np.testing.assert_allclose([p for _, p in logprobs[0].top], [p for _, p in want_logprobs[0].top],
                                   atol=tolerance, rtol=0)
    assert len(ks) == len(want_ks)
    for got, want in zip(ks + vs, want_ks + want_vs):
        assert got.shape == want.shape  # the whole prompt's padded width, as a prefill returns it
        np.testing.assert_allclose(np.asarray(got)[0, : len(prompt)], np.asarray(want)[0, : len(prompt)],
                                   atol=tolerance, rtol=0)
    return cached, chunks


def test_chunks_put_the_remainder_first(demo):
    chunked = _runner(demo, 32).chunked
    assert chunked.chunks(100, 0) == [4, 32, 32, 32]
    assert chunked.chunks(96, 0) == [32, 32, 32]
    assert chunked.chunks(100, 48) == [20, 32]
    assert chunked.wants(list(range(33)), SamplingParams()) and not chunked.wants(list(range(32)), SamplingParams())
    # Prompt logprobs need every prompt token's logits at once: such a prompt is prefilled whole.
    assert not chunked.wants(list(range(100)), SamplingParams(prompt_logprobs=1))
    with pytest.raises(ValueError, match="at least 1 token"):
        ChunkedPrefill(_runner(demo), None, 0)


@pytest.mark.parametrize("chunk_tokens, length", [(16, 150), (40, 81), (64, 65), (32, 96)])
def test_chunked_prefill_equals_the_whole_prefill(demo, chunk_tokens, length):
    """Chunk sizes that are and are not buckets, a one-token first chunk, an exact multiple."""
    rng = np.random.default_rng(length)
    prompt = rng.integers(3, 2048, length).tolist()
    whole = _runner(demo)
    _, chunks = _assert_same(_runner(demo, chunk_tokens), whole, prompt, SamplingParams(max_tokens=2, logprobs=5))
    assert chunks == -(-length // chunk_tokens)


def test_the_first_token_samples_with_its_own_rows_written_after_the_chunks(demo):
    """Logit bias, allowed ids, a repetition penalty over the whole prompt and a grammar apply at the
    last chunk, whatever ran between chunks in the same rows."""
    runner, whole = _runner(demo, 16), _runner(demo)
    prompt = np.random.default_rng(3).integers(3, 2048, 70).tolist()
    for params in (SamplingParams(max_tokens=2, logit_bias={prompt[5]: 30.0}, repetition_penalty=1.5),
                   SamplingParams(max_tokens=2, allowed_token_ids=(prompt[3], 77, 78), logprobs=2),
                   SamplingParams(max_tokens=2, structured_outputs={"regex": "[0-9]+"})):
        steps = runner.chunked.run(prompt, params, 0)
        next(steps)  # the first chunk; then a whole prefill with other sampling rows, as the engine may run
        runner.prefill([[9, 8, 7]], [SamplingParams(max_tokens=2, logit_bias={11: 50.0})], [0])
        for _ in steps:
            pass
        _assert_same(runner, whole, prompt, params)


def test_chunked_prefill_on_tp2_with_gqa3_hd40(hf_checkpoint):
    """3 KV heads on tp=2 (the serving layout repeats them per shard), head_dim 40."""
    directory, torch_model = hf_checkpoint("qwen2_gqa3_hd40_llama3rope")
    model = load_model(str(directory), make_mesh(MeshConfig(2)))
    assert not model.layout.is_identity
    prompt = np.random.default_rng(1).integers(3, torch_model.config.vocab_size, 75).tolist()
    _assert_same(_runner(model, 24), _runner(model), prompt, SamplingParams(max_tokens=2, logprobs=3))


def test_chunked_prefill_after_a_prefix_cache_hit(demo):
    runner, whole = _runner(demo, 32, prefix_pages=32), _runner(demo)
    rng = np.random.default_rng(4)
    system = rng.integers(3, 2048, 50).tolist()
    first = system + rng.integers(3, 2048, 40).tolist()
    assert _assert_same(runner, whole, first, SamplingParams(max_tokens=2))[0] == 0  # fills the cache
    second = system + rng.integers(3, 2048, 70).tolist()
    cached, chunks = _assert_same(runner, whole, second, SamplingParams(max_tokens=2, logprobs=4))
    assert cached == 48 and chunks == 3  # 3 whole blocks of 16 cached; 72 left: 8, 32, 32
    assert runner.prefix_cache.hit_tokens == 48


def _engine_run(runner, jobs, turns=None):
    """Submits `jobs` before the engine starts, runs it, and returns (results, done order, K/V sent by id)."""
    sent, order = {}, []

    def send_kv(job, kv):
        k_layers, v_layers = kv.host_layers(runner.model.layout.kv_source)
        sent[job.request_id] = [np.array(x) for x in list(k_layers) + list(v_layers)]

    engine = PrefillEngine(runner, send_kv, max_prefill_batch=4, turns=turns)
    futures = [engine.submit(job) for job in jobs]
    for job, future in zip(jobs, futures):
        future.add_done_callback(lambda _, rid=job.request_id: order.append(rid))
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.stop()
        thread.join(60)
    assert engine.in_flight == 0 and engine.prefilled == len(jobs)
    engine._senders.shutdown(wait=True)
    return results, order, sent


def test_the_engine_runs_short_prompts_between_a_long_prompts_chunks(demo):
    runner, whole = _runner(demo, 16), _runner(demo)
    rng = np.random.default_rng(5)
    prompts = {"long": rng.integers(3, 2048, 100).tolist(), "short-1": [5, 6, 7], "short-2": [8, 9]}
    jobs = [PrefillJob(rid, p, SamplingParams(max_tokens=2), "decode:1") for rid, p in prompts.items()]
    results, order, sent = _engine_run(runner, jobs)
    # The long prompt, first in line, starts; the short ones then go between its chunks and finish first.
    assert order == ["short-1", "short-2", "long"]
    for (rid, prompt), token in zip(prompts.items(), results):
        (want, _, _), ks, vs, _ = whole.prefill_sampled([prompt], [SamplingParams(max_tokens=2)], [0])
        assert token == want[0]
        for got, layer in zip(sent[rid], ks + vs):
            np.testing.assert_allclose(got, np.asarray(layer)[0, : len(prompt)], atol=2e-5, rtol=0)


class _LoggedTurns(DeviceTurns):
    """Device turns that note which thread held each."""

    def __init__(self):
        super().__init__()
        self.log: list[str] = []

    def turn(self):
        outer = super().turn()

        class _Noted:
            def __enter__(inner):
                outer.__enter__()
                self.log.append(threading.current_thread().name)

            def __exit__(inner, *exc):
                return outer.__exit__(*exc)

        return _Noted()


@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_a_colocated_decode_gets_turns_between_the_chunks(demo, chunk_tokens):
    """A stand-in for the decode engine asks for the device again as soon as it gives it back. Chunked,
    it runs between every two chunks of the long prompt; whole, the prompt is one turn."""
    runner = _runner(demo, chunk_tokens)
    turns, stop = _LoggedTurns(), threading.Event()

    def decoder():
        while not stop.is_set():
            with turns.turn():
                stop.wait(0.002)

    thread = threading.Thread(target=decoder, name="decode", daemon=True)
    thread.start()
    try:
        job = PrefillJob("long", np.random.default_rng(6).integers(3, 2048, 100).tolist(),
                         SamplingParams(max_tokens=2), "")
        _engine_run(runner, [job], turns)
    finally:
        stop.set()
        thread.join(10)
    prefill_turns = [i for i, name in enumerate(turns.log) if name != "decode"]
    between = turns.log[prefill_turns[0]: prefill_turns[-1]].count("decode")
    if chunk_tokens:
        assert len(prefill_turns) == 7 and between == 6  # chunks of 4, then 6 x 16
    else:
        assert len(prefill_turns) == 1 and between == 0


def test_a_chunk_that_fails_fails_its_request_and_gives_its_turn_back(demo, monkeypatch):
    runner, turns = _runner(demo, 16), DeviceTurns()
    engine = PrefillEngine(runner, lambda job, kv: None, max_prefill_batch=2, turns=turns)

    def broken(prompt, params, step):
        yield  # the first chunk went well
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner.chunked, "run", broken)
    job = PrefillJob("r", list(range(3, 40)), SamplingParams(max_tokens=2), "")
    engine.submit(job)
    work = engine._next_work()
    engine._prefill_chunk(work)
    assert not job.first_token.done() and engine.in_flight == 1
    with pytest.raises(RuntimeError, match="device lost"):  # run_forever would now exit the process
        engine._prefill_chunk(engine._next_work())
    with pytest.raises(RuntimeError, match="device lost"):
        job.first_token.result(timeout=1)
    assert engine.in_flight == 0
    with turns.turn():  # free at once
        assert turns.waiting == 0


def test_a_worker_refuses_chunked_prefill_on_a_decode_worker_and_negative_sizes():
    from splitserve.runtime.launch import LaunchConfig
    from splitserve.runtime.worker import WorkerConfig

    with pytest.raises(ValueError, match="not a decode worker"):
        WorkerConfig(role="decode", model="demo", prefill_chunk_tokens=16)
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be >= 0, got -1"):
        WorkerConfig(role="prefill", model="demo", prefill_chunk_tokens=-1)
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be >= 0, got -2"):
        LaunchConfig(model="demo", prefill_chunk_tokens=-2)
    assert dataclasses.replace(WorkerConfig(role="colocated", model="demo"), prefill_chunk_tokens=8)


@pytest.mark.parametrize("why", ["caller left", "deadline passed"])
def test_a_long_prompt_stops_between_chunks_when_its_caller_leaves_or_its_deadline_passes(demo, why):
    import concurrent.futures
    import time

    from splitserve.runtime.deadlines import DeadlinePassed

    runner = _runner(demo, 16)
    engine = PrefillEngine(runner, lambda job, kv: None, max_prefill_batch=2)
    ran = []
    real = runner.chunked.run

    def counted(*args):  # notes each chunk that yields (all but the last)
        steps = real(*args)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            ran.append(1)
            yield

    runner.chunked.run = counted
    deadline = time.monotonic() + 60 if why == "caller left" else None
    job = PrefillJob("r", list(range(3, 100)), SamplingParams(max_tokens=2), "", deadline=deadline)
    engine.submit(job)
    engine._prefill_chunk(engine._next_work())  # the first chunk
    if why == "caller left":
        job.abandoned.set()  # what PrefillService's callback does when the RPC ends
    else:
        job.deadline = time.monotonic() - 1
    engine._prefill_chunk(engine._next_work())
    assert len(ran) == 1 and engine.in_flight == 0  # no second chunk ran
    error = concurrent.futures.CancelledError if why == "caller left" else DeadlinePassed
    with pytest.raises(error):
        job.first_token.result(timeout=1)
    # The engine goes on: the next long prompt is prefilled whole.
    again = PrefillJob("s", list(range(3, 40)), SamplingParams(max_tokens=2), "")
    engine.submit(again)
    while not again.first_token.done():
        engine._prefill_chunk(engine._next_work())
    assert again.first_token.result() == runner.prefill([again.prompt_ids], [SamplingParams(max_tokens=2)], [0])[0][0]
