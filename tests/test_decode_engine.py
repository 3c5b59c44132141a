"""The decode engine frees a cancelled request's pages at once, without waiting for a step."""

from __future__ import annotations

import threading

import pytest

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.decode_engine import END, DecodeEngine
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    runner = ModelRunner(load_model("demo", make_mesh(MeshConfig(1))), RunnerConfig(num_pages=64, max_batch=8))
    engine = DecodeEngine(runner, max_batch=8)
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    yield engine
    engine.stop()
    thread.join(30)


def test_cancel_mid_decode_frees_pages_before_the_next_step(engine):
    runner = engine.runner
    total = engine.stats()["free_pages"]
    prompt = list(range(3, 40))
    first, ks, vs, _ = runner.prefill([prompt], [SamplingParams(max_tokens=500)], [0])
    engine.reserve("r", len(prompt) + 500, lease_s=30)
    engine.kv_arrived("r", runner.kv_to_host(ks, vs, 0, len(prompt)), len(prompt), first[0])
    out = engine.open_stream("r", SamplingParams(max_tokens=500, ignore_eos=True))
    for _ in range(3):
        assert isinstance(out.get(timeout=60), tuple)  # decoding: three tokens out
    assert engine.stats()["free_pages"] < total

    steps = engine.steps
    assert engine.release("r") is True  # what the Stream handler's cancel callback calls
    freed = engine.stats()["free_pages"]
    steps_after = engine.steps
    assert freed == total, "pages were not back in the pool when release returned"
    assert steps_after - steps <= 1  # at most the step already running when the cancel came
    items = []
    while (item := out.get(timeout=30)) is not END:
        items.append(item)
    assert len(items) <= 1  # nothing but a token from that in-flight step, then the end
    assert engine.stats()["free_pages"] == total and engine.stats()["running"] == 0


def test_a_decode_batch_larger_than_the_runners_is_refused_at_construction():
    runner = ModelRunner(load_model("demo", make_mesh(MeshConfig(1))), RunnerConfig(num_pages=8, max_batch=4))
    with pytest.raises(ValueError, match="decode max_batch 8 exceeds the runner's 4"):
        DecodeEngine(runner, max_batch=8)
