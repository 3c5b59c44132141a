"""The colocated engine on the demo model: stop rules, seeds, abort, bad input, text."""

import dataclasses

import numpy as np
import pytest

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return load_model("demo", make_mesh(MeshConfig(1)))


@pytest.fixture()
def engine(demo):
    return ColocatedEngine(demo, EngineConfig(page_size=8, num_pages=64, max_batch=4))


def prompt(demo, text="The kitchen was warm and the bread"):
    return demo.tokenizer.encode(text)


def greedy(engine, ids, n=24, **kw):
    return engine.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True, **kw))[0]


def test_text_is_the_detokenized_tokens(demo, engine):
    out = greedy(engine, prompt(demo))
    assert len(out.token_ids) == 24 and out.finish_reason == "length"
    assert out.text == demo.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids[0] == demo.config.bos_token_id


def test_stop_string_truncates_text_and_stops(demo, engine):
    full = greedy(engine, prompt(demo))
    stop = full.text[8:12]
    cut = full.text.index(stop)
    out = greedy(engine, prompt(demo), stop=(stop,))
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < 24


def test_stop_token_id_and_eos(demo, engine):
    full = greedy(engine, prompt(demo))
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = greedy(engine, prompt(demo), stop_token_ids=(stop_id,))
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop"
    before = engine.generate([prompt(demo)], SamplingParams(max_tokens=max(first, 1), ignore_eos=True))[0].text
    before = before if first else ""
    assert out.text == before  # the stop token's own text is left out, as vLLM does

    eos_model = dataclasses.replace(demo, config=dataclasses.replace(demo.config, eos_token_ids=(stop_id,)))
    eos_engine = ColocatedEngine(eos_model, EngineConfig(page_size=8, num_pages=64, max_batch=4))
    stopped = eos_engine.generate([prompt(demo)], SamplingParams(max_tokens=24))[0]
    assert stopped.token_ids == full.token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert greedy(eos_engine, prompt(demo)).token_ids == full.token_ids  # ignore_eos


def test_seed_gives_the_same_tokens_whatever_else_is_batched(demo, engine):
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = engine.generate([prompt(demo)], sampled)[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=99)
    batched = engine.generate([prompt(demo, "Rain fell"), prompt(demo), prompt(demo)],
                              [other, sampled, dataclasses.replace(sampled, seed=4321)])
    assert batched[1].token_ids == alone
    assert batched[2].token_ids != alone


def test_abort_mid_decode_frees_pages_at_once(demo, engine):
    rid = engine.add_request(prompt(demo), SamplingParams(max_tokens=40, ignore_eos=True))
    keep = engine.add_request(prompt(demo, "Rain"), SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    free_before = engine.allocator.free_count
    engine.abort(rid)
    assert engine.allocator.free_count > free_before
    assert engine.release(rid).finish_reason == "abort"
    while not engine.is_finished(keep):
        engine.step()
    assert len(engine.release(keep).token_ids) == 40
    assert engine.allocator.free_count == engine.allocator.capacity


@pytest.mark.parametrize("ids, params, message", [
    ([], SamplingParams(), "empty"),
    ([1, 10**6], SamplingParams(), "outside the vocabulary"),
    ([1, -3], SamplingParams(), "outside the vocabulary"),
    ([1] * 2000, SamplingParams(max_tokens=100), "exceeds the model's context"),
])
def test_bad_requests_are_rejected_and_the_engine_keeps_serving(demo, engine, ids, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(ids, params)
    assert not engine.has_unfinished()
    assert len(greedy(engine, prompt(demo), n=3).token_ids) == 3


def test_many_requests_batched_equal_one_at_a_time(demo, engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, demo.config.vocab_size, size=n).tolist() for n in (3, 9, 17, 30, 41, 8)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    together = [o.token_ids for o in engine.generate(prompts, params)]
    assert together == [greedy(engine, p, n=10).token_ids for p in prompts]
    assert engine.allocator.free_count == engine.allocator.capacity


def test_a_request_id_used_again_starts_its_penalties_afresh(demo, engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=2.0)
    fresh = ColocatedEngine(demo, engine.config).generate([prompt(demo)], params)[0].token_ids
    for _ in range(2):  # the same id, one request after the other: nothing in between decodes
        engine.add_request(prompt(demo), params, request_id="x")
        while not engine.is_finished("x"):
            engine.step()
        assert engine.release("x").token_ids == fresh
