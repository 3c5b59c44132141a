"""Engines sharing one device take turns, first come first served (runtime/device_turns.py)."""

from __future__ import annotations

import threading
import time

import pytest

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.decode_engine import END, DecodeEngine
from splitserve.runtime.device_turns import DeviceTurns
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.prefill_engine import PrefillEngine, PrefillJob
from splitserve.runtime.sampling_params import SamplingParams


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_turns_are_granted_in_the_order_they_were_asked_for():
    turns, order = DeviceTurns(), []
    holder_may_leave = threading.Event()

    def holder():
        with turns.turn():
            order.append("holder")
            holder_may_leave.wait(10)

    def waiter(name):
        with turns.turn():
            order.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    _wait_until(lambda: order == ["holder"])
    for i, name in enumerate(["second", "third", "fourth"]):  # each asks only once the one before waits
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        _wait_until(lambda: turns.waiting == i + 1)
    holder_may_leave.set()
    for t in threads:
        t.join(10)
    assert order == ["holder", "second", "third", "fourth"]
    assert turns.waiting == 0


def test_a_turn_that_raises_is_given_back():
    turns = DeviceTurns()
    with pytest.raises(RuntimeError, match="boom"):
        with turns.turn():
            raise RuntimeError("boom")
    done = threading.Event()

    def next_turn():
        with turns.turn():
            done.set()

    threading.Thread(target=next_turn, daemon=True).start()
    assert done.wait(10), "the turn of the failed holder was never given back"


def test_a_failed_prefill_fails_its_requests_and_gives_its_turn_back(runner):
    turns = DeviceTurns()
    engine = PrefillEngine(runner, lambda job, kv: None, max_prefill_batch=2, turns=turns)
    real = runner.prefill_async

    def broken(*args):
        raise RuntimeError("device lost")

    runner.prefill_async = broken
    job = PrefillJob("r", [3, 4, 5], SamplingParams(max_tokens=2), decode_address="")
    engine.submit(job)
    try:
        with pytest.raises(RuntimeError, match="device lost"):  # run_forever would now exit the process
            engine._prefill(engine._next_work())
    finally:
        runner.prefill_async = real
    with pytest.raises(RuntimeError, match="device lost"):
        job.first_token.result(timeout=1)
    assert engine.in_flight == 0
    with turns.turn():  # free at once
        assert turns.waiting == 0


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return ModelRunner(load_model("demo", make_mesh(MeshConfig(1))), RunnerConfig(num_pages=64, max_batch=8,
                                                                                  max_prefill_batch=2))


def test_colocated_prefill_and_decode_never_run_on_the_device_at_once(runner):
    """Prompts arrive one by one while earlier requests decode, as in a colocated worker: every
    prefill (dispatch to first tokens on the host) falls between the decode engine's device work
    (KV inserts and steps), never inside it, and every request still gets the tokens of the
    engine run alone."""
    busy: list[tuple[str, float, float]] = []  # (engine, start, end) of device work
    real_prefill, real_decode, real_insert = runner.prefill_async, runner.decode_sampled, runner.insert_kv

    class TimedTokens:  # the prefill's device work ends when its first tokens reach the host
        def __init__(self, first, start):
            self.first, self.start = first, start

        def to_host(self, params):
            tokens = self.first.to_host(params)
            busy.append(("prefill", self.start, time.perf_counter()))
            return tokens

    def timed_prefill(*args):
        start = time.perf_counter()
        first, ks, vs, lengths = real_prefill(*args)
        return TimedTokens(first, start), ks, vs, lengths

    def timed(method):  # the decode engine's device work: inserting arrived KV, and its steps
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            busy.append(("decode", start, time.perf_counter()))
            return result

        return run

    turns = DeviceTurns()
    decode = DecodeEngine(runner, max_batch=8, turns=turns)

    def send_kv(job, kv):  # the colocated worker's hand-over: the KV stays on the device
        decode.kv_arrived(job.request_id, kv, kv.length, job.first_token.result())

    prefill = PrefillEngine(runner, send_kv, max_prefill_batch=2, turns=turns)
    runner.prefill_async, runner.decode_sampled = timed_prefill, timed(real_decode)
    runner.insert_kv = timed(real_insert)
    threads = [threading.Thread(target=e.run_forever, daemon=True) for e in (decode, prefill)]
    for t in threads:
        t.start()
    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    try:
        streams = []
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            decode.reserve(rid, len(prompt) + params.max_tokens, lease_s=60)
            first = prefill.submit(PrefillJob(rid, prompt, params, decode_address="self")).result(timeout=60)
            streams.append((first, decode.open_stream(rid, params)))
            if i == 0:  # the rest arrive while it decodes
                _wait_until(lambda: decode.steps >= 3, timeout_s=60)
        outputs = []
        for first, out in streams:
            tokens = [first]
            while (item := out.get(timeout=60)) is not END:
                tokens.append(item[0])
            outputs.append(tokens)
    finally:
        runner.prefill_async, runner.decode_sampled, runner.insert_kv = real_prefill, real_decode, real_insert
        decode.stop()
        prefill.stop()
        for t in threads:
            t.join(30)

    prefills = [(s, e) for kind, s, e in busy if kind == "prefill"]
    decodes = [(s, e) for kind, s, e in busy if kind == "decode"]
    assert len(prefills) >= 5 and len(decodes) >= params.max_tokens  # each prompt came alone (one joined late)
    later = sorted(prefills)[1:]  # each arrived while earlier requests decoded: decode work on both sides
    assert all(any(e <= start for _, e in decodes) and any(s >= end for s, _ in decodes) for start, end in later)
    overlaps = [(p, d) for p in prefills for d in decodes if min(p[1], d[1]) > max(p[0], d[0])]
    assert not overlaps, f"prefill and decode ran at once: {overlaps[:3]}"

    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig  # the same prompts, one engine

    alone = ColocatedEngine(runner.model, EngineConfig(num_pages=64, max_batch=8)).generate(prompts, params)
    assert outputs == [c.token_ids for c in alone]


def test_only_a_colocated_worker_on_a_cpu_shares_turns_between_its_engines(runner):  # runner: the demo model cached
    from splitserve.runtime.device_turns import no_turns
    from splitserve.runtime.worker import Worker, WorkerConfig

    workers = {role: Worker(WorkerConfig(role=role, model="demo", num_pages=8, warmup="minimal", kv_transport="grpc"))
               for role in ("colocated", "decode", "prefill")}
    try:
        colocated = workers["colocated"]
        turns = colocated.decode_engine._device_turn.__self__
        assert isinstance(turns, DeviceTurns) and colocated.prefill_engine._device_turn.__self__ is turns
        assert workers["decode"].decode_engine._device_turn is no_turns  # alone on their devices
        assert workers["prefill"].prefill_engine._device_turn is no_turns
    finally:
        for worker in workers.values():  # never started: only the port and channels to let go
            worker.server.stop(0)
            worker.channels.close()
