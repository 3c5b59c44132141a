"""Prefix caching: the index's matching and eviction, and a prefill after a cached prefix equals a
prefill of the whole prompt (first tokens, logits, every layer's K/V), on the demo model and on
a transformers-saved GQA checkpoint whose head_dim is not a power of two."""

from __future__ import annotations

import re

import numpy as np
import pytest

from splitserve.runtime.prefix_index import PrefixIndex


# -- the index -------------------------------------------------------------------------------
def test_lookup_matches_whole_blocks_and_leaves_the_last_token():
    index = PrefixIndex(num_pages=16, block_size=4)
    prompt = list(range(100, 112))  # 3 blocks exactly
    assert index.lookup(prompt).tokens == 0
    new = index.store(prompt, set())
    assert new.first_block == 0 and len(new.pages) == 3 and 0 not in new.pages
    # The whole prompt again: 2 blocks, so its last token is computed.
    assert index.lookup(prompt).tokens == 8
    longer = index.lookup(prompt + [7, 7])
    assert longer.tokens == 12 and list(longer.pages) == list(new.pages)
    # A prompt that differs in block 2 matches only block 1; one that differs in block 1, nothing.
    assert index.lookup(prompt[:4] + [0] + prompt[5:] + [1]).tokens == 4
    assert index.lookup([0] + prompt[1:] + [1]).tokens == 0
    # A block matches only after the same parent: block 2's tokens at the start are no hit.
    assert index.lookup(prompt[4:] + [1]).tokens == 0


def test_store_takes_only_new_blocks():
    index = PrefixIndex(num_pages=16, block_size=4)
    first = index.store(list(range(8)), set())
    again = index.store(list(range(8)) + [9], set())  # a partial block is not stored
    assert again is None
    more = index.store(list(range(16)), set())
    assert more.first_block == 2 and len(more.pages) == 2
    assert set(more.pages).isdisjoint(first.pages)
    assert len(index) == 4


def test_eviction_is_least_recently_used_and_never_strands_a_block():
    index = PrefixIndex(num_pages=5, block_size=2)  # 4 usable pages
    a, b = [1, 1, 2, 2], [3, 3, 4, 4]
    index.store(a, set())
    index.store(b, set())
    index.lookup(a + [0])  # a is now the most recent
    index.store([5, 5, 6, 6], set())  # full: b's blocks go, leaf first
    assert index.lookup(a + [0]).tokens == 4
    assert index.lookup(b + [0]).tokens == 0
    assert index.lookup([5, 5, 6, 6, 0]).tokens == 4
    assert len(index) == 4
    # Every stored block is reachable: evicting a parent took its children with it.
    index.store([7, 7, 8, 8, 9, 9], set())
    assert len(index) <= 4 and sorted(index._free + [blk.page for blk in index._by_id.values()]) == [1, 2, 3, 4]


def test_store_never_evicts_the_prompts_own_blocks():
    index = PrefixIndex(num_pages=5, block_size=2)  # 4 usable pages
    chat = [1, 1, 2, 2, 3, 3, 4, 4]
    assert len(index.store(chat, set()).pages) == 4  # full
    longer = chat + [5, 5, 6, 6, 7]
    assert index.lookup(longer).tokens == 8
    assert index.store(longer, set()) is None  # no room but its own blocks, which stay
    assert index.lookup(longer).tokens == 8
    tiny = PrefixIndex(num_pages=2, block_size=2)  # capacity 1
    tiny.store([1, 1], set())
    assert tiny.store([1, 1, 2, 2, 3], set()) is None and tiny.lookup([1, 1, 2]).tokens == 2
    assert tiny.store([7, 7], set()).pages == (1,)  # another prompt evicts it
    assert tiny.lookup([1, 1, 2]).tokens == 0 and tiny.lookup([7, 7, 0]).tokens == 2


def test_a_store_that_fails_midway_leaves_no_entry_for_its_pages(monkeypatch):
    index = PrefixIndex(num_pages=8, block_size=2)
    index.store([1, 1], set())
    taken = index._take_page
    calls = []

    def failing(keep):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return taken(keep)

    monkeypatch.setattr(index, "_take_page", failing)
    written: set[int] = set()
    with pytest.raises(RuntimeError, match="injected"):
        index.store([1, 1, 2, 2, 3, 3], written)
    assert written == set() and len(index) == 1  # the block it took is undone; the earlier one stays
    assert index.lookup([1, 1, 2, 2, 3]).tokens == 2
    assert sorted(index._free + [b.page for b in index._by_id.values()]) == list(range(1, 8))


def test_store_never_evicts_a_page_it_is_about_to_write():
    index = PrefixIndex(num_pages=3, block_size=2)  # 2 usable pages
    written: set[int] = set()
    first = index.store([1, 1, 2, 2], written)
    assert len(first.pages) == 2 and written == set(first.pages)
    assert index.store([3, 3, 4, 4], written) is None  # no page may be taken from the first row
    assert index.lookup([1, 1, 2, 2, 0]).tokens == 4


# -- the attention after a cached prefix ----------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 40), (8, 2, 64), (6, 1, 16)])
def test_attention_after_a_prefix_equals_the_reference_rows_of_a_whole_prompt(heads, kv_heads, head_dim):
    """Ragged prefixes and prompts, a new part longer than one query chunk, NaN past each prompt."""
    import jax.numpy as jnp

    from splitserve.models.attention import QUERY_CHUNK, attention_after_prefix
    from splitserve.pallas_kernels.reference import flash_attention_reference

    rng = np.random.default_rng(heads)
    prefixes, totals = [0, 48, 16], [70, 48 + QUERY_CHUNK + 37, 17]
    width, seq = 48 + QUERY_CHUNK + 40, QUERY_CHUNK + 40
    q_full = rng.standard_normal((3, width, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((3, width, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((3, width, kv_heads, head_dim)).astype(np.float32)
    for row, total in enumerate(totals):
        k[row, total:] = v[row, total:] = np.nan
    want = np.asarray(flash_attention_reference(jnp.asarray(q_full), jnp.asarray(np.nan_to_num(k)),
                                                jnp.asarray(np.nan_to_num(v)), lengths=jnp.asarray(totals)))
    q_new = np.zeros((3, seq, heads, head_dim), np.float32)
    for row, (p, total) in enumerate(zip(prefixes, totals)):
        q_new[row, : total - p] = q_full[row, p:total]
    got = np.asarray(attention_after_prefix(jnp.asarray(q_new), jnp.asarray(k), jnp.asarray(v),
                                            jnp.asarray(prefixes, jnp.int32), jnp.asarray(totals, jnp.int32)))
    for row, (p, total) in enumerate(zip(prefixes, totals)):
        np.testing.assert_allclose(got[row, : total - p], want[row, p:total], atol=2e-5, rtol=1e-5)
    assert np.isfinite(got).all()


# -- a prefill after a cached prefix ---------------------------------------------------------
def _runner(model, prefix_pages):
    from splitserve.runtime.model_runner import ModelRunner, RunnerConfig

    return ModelRunner(model, RunnerConfig(num_pages=8, max_batch=8, decodes=False,
                                           prefix_cache_pages=prefix_pages))


def _prefill(runner, prompts, params=None):
    from splitserve.runtime.sampling_params import SamplingParams

    params = params or [SamplingParams(max_tokens=4, logprobs=5) for _ in prompts]
    (first, logprobs, _), ks, vs, lengths = runner.prefill_sampled(prompts, params, [0] * len(prompts))
    kv = [(np.asarray(k)[row, :n], np.asarray(v)[row, :n]) for row, n in enumerate(lengths[: len(prompts)])
          for k, v in zip(ks, vs)]
    return first, logprobs, kv, list(lengths[: len(prompts)])


def _assert_same_prefill(got, want, tolerance):
    first, logprobs, kv, lengths = got
    assert first == want[0] and lengths == want[3]
    for a, b in zip(logprobs, want[1]):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], atol=tolerance, rtol=0)
    for (k, v), (wk, wv) in zip(kv, want[2]):
        np.testing.assert_allclose(k, wk, atol=tolerance, rtol=0)
        np.testing.assert_allclose(v, wv, atol=tolerance, rtol=0)


def _check_model(model, vocab, tolerance):
    rng = np.random.default_rng(0)
    system = rng.integers(3, vocab, 40).tolist()  # 2 whole blocks of 16 and a partial one
    cached, plain = _runner(model, 64), _runner(model, 0)
    # The first batch fills the cache; nothing is found yet.
    warm = [system + rng.integers(3, vocab, 10).tolist(), rng.integers(3, vocab, 33).tolist()]
    _assert_same_prefill(_prefill(cached, warm), _prefill(plain, warm), tolerance)
    assert cached.prefix_cache.hit_tokens == 0
    # Ragged rows: a 32-token hit (the system prompt's whole blocks), a 48-token hit (the first
    # prompt's 3 blocks), a row with no hit, and the second prompt again (32 cached, 1 new token).
    batch = [system + rng.integers(3, vocab, 9).tolist(),
             warm[0] + rng.integers(3, vocab, 20).tolist(),
             rng.integers(3, vocab, 21).tolist(),
             warm[1]]
    _assert_same_prefill(_prefill(cached, batch), _prefill(plain, batch), tolerance)
    assert cached.prefix_cache.hit_tokens == 32 + 48 + 0 + 32
    assert cached.prefix_cache.queried_tokens == sum(map(len, warm + batch))


def test_prefill_after_a_prefix_equals_the_whole_prefill_demo():
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh

    _check_model(load_model("demo", make_mesh(MeshConfig(1))), 2048, 2e-5)


def test_prefill_after_a_prefix_equals_the_whole_prefill_tp2():
    """The pool is sharded over the KV heads like the cache; the gather and the attention follow."""
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh

    _check_model(load_model("demo", make_mesh(MeshConfig(2))), 2048, 2e-5)


def test_prefill_after_a_prefix_equals_the_whole_prefill_gqa3_hd40_tp2(hf_checkpoint):
    """3 KV heads on tp=2: the serving layout repeats them per shard, and the pool holds that layout."""
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh

    directory, torch_model = hf_checkpoint("qwen2_gqa3_hd40_llama3rope")
    model = load_model(str(directory), make_mesh(MeshConfig(2)))
    assert not model.layout.is_identity
    _check_model(model, torch_model.config.vocab_size, 2e-5)


def test_a_prefix_cache_too_small_for_one_block_is_refused():
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.worker import prefix_cache_pages

    model = load_model("demo", make_mesh(MeshConfig(1)))
    assert prefix_cache_pages(0, model, 16, 1) == 0
    per_page = 2 * 4 * 4 * 16 * 32 * 4  # K and V, 4 layers, 4 KV heads, 16 tokens, head_dim 32, f32
    assert prefix_cache_pages(3 * per_page / (1 << 30), model, 16, 1) == 3
    with pytest.raises(ValueError, match="holds 0 blocks"):
        prefix_cache_pages(1.5 * per_page / (1 << 30), model, 16, 1)


def test_prompt_logprobs_rows_are_computed_whole_beside_a_hit():
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.sampling_params import SamplingParams

    model = load_model("demo", make_mesh(MeshConfig(1)))
    cached, plain = _runner(model, 64), _runner(model, 0)
    prompt = list(range(10, 60))
    _prefill(cached, [prompt])
    params = [SamplingParams(max_tokens=2, prompt_logprobs=2), SamplingParams(max_tokens=2)]
    prompts = [prompt + [5], prompt + [6]]
    queried, hits = cached.prefix_cache.queried_tokens, cached.prefix_cache.hit_tokens
    (first, _, got), _, _, _ = cached.prefill_sampled(prompts, params, [0, 0])
    (want_first, _, want), _, _, _ = plain.prefill_sampled(prompts, params, [0, 0])
    assert cached.prefix_cache.hit_tokens - hits == 48  # only the second row was looked up
    assert cached.prefix_cache.queried_tokens - queried == len(prompts[1])
    assert first == want_first and got[1] is None and len(got[0]) == len(prompts[0]) - 1
    for a, b in zip(got[0], want[0]):
        assert a.rank == b.rank and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=2e-5)


def test_colocated_engine_with_prefix_caching_equals_without():
    """In-process (as `splitserve batch` runs): prompts with shared starts in one batch and after it."""
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
    from splitserve.runtime.sampling_params import SamplingParams

    model = load_model("demo", make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(2)
    shots = rng.integers(3, 2048, 40).tolist()
    prompts = [shots + rng.integers(3, 2048, n).tolist() for n in (3, 9, 30, 2)]
    params = SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.3)
    plain = ColocatedEngine(model, EngineConfig(num_pages=64)).generate(prompts, params)
    cached = ColocatedEngine(model, EngineConfig(num_pages=64, prefix_cache_pages=32))
    first = cached.generate(prompts[:1], params)  # stores the shots' 2 whole blocks
    rest = cached.generate(prompts[1:], params)
    assert [c.token_ids for c in first + rest] == [c.token_ids for c in plain]
    assert cached.runner.prefix_cache.hit_tokens == 3 * 32
    assert [c.cached_prompt_tokens for c in first + rest] == [0, 32, 32, 32]
    assert [c.cached_prompt_tokens for c in plain] == [0] * 4


# -- served: a launched stack with prefix caching ----------------------------------------------
@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_launched_stack_with_prefix_caching_equals_colocated_without(tmp_path, mode):
    """Prompts that share a long start, through a launched stack whose prefill (or colocated) workers
    cache prefixes: the tokens equal an in-process colocated engine's without a cache, and the
    workers' metrics count the hits. Disaggregated, with two caching prefill workers: every prompt
    that shares the start goes where the first one ran (runtime/prefix_affinity.py), also when
    four come at once, so the least loaded worker would alternate."""
    import concurrent.futures
    import os

    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.client import Client
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
    from splitserve.runtime.sampling_params import SamplingParams
    from stack import launched
    from test_metrics import scrape, value

    rng = np.random.default_rng(1)
    system = rng.integers(3, 2048, 70).tolist()
    prompts = [system + rng.integers(3, 2048, n).tolist() for n in (6, 1, 23)] + [system[:50]]
    cases = [(p, dict(max_tokens=12, ignore_eos=True)) for p in prompts]
    cases.append((prompts[2], dict(max_tokens=12, ignore_eos=True, temperature=0.8, top_p=0.9, seed=7)))
    at_once = [system + rng.integers(3, 2048, 8).tolist() for _ in range(4)]

    engine = ColocatedEngine(load_model("demo", make_mesh(MeshConfig(1))), EngineConfig(num_pages=64))
    want = engine.generate([p for p, _ in cases], [SamplingParams(**s) for _, s in cases])
    os.environ["SPLITSERVE_CACHE"] = str(tmp_path / "cache")
    workers = ("--prefill-workers", "2") if mode == "disaggregated" else ()
    with launched("demo", "--mode", mode, "--enable-prefix-caching", "--metrics-port", "0",
                  "--num-pages", "64", *workers) as stack, Client(stack.address, timeout=120) as client:
        answers = [client.generate(token_ids=p, **s) for p, s in cases]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            concurrent_answers = list(pool.map(lambda p: client.generate(token_ids=p, max_tokens=2), at_once))
        line = next(line for line in stack.lines if line.startswith("splitserve metrics:"))
        pages = [scrape(url) for url in re.findall(r"(?:prefill|colocated) \S+ (http\S+/metrics)", line)]
    assert [a.token_ids for a in answers] == [w.token_ids for w in want]
    # Hits, in blocks of 16: none for the first prompt (it stores 4 blocks); the system prompt's 4
    # for the next two (the third stores a fifth); 3 for the system prompt's first 50 tokens; 5
    # for the third prompt again; then the system prompt's 4 for each of the four at once.
    assert [a.cached_prompt_tokens for a in answers] == [0, 64, 64, 48, 80]  # each answer says its own
    assert [a.cached_prompt_tokens for a in concurrent_answers] == [64] * 4
    hits = sorted(value(p, "prefix_cache_hits_total") for p in pages)
    queried = sorted(value(p, "prefix_cache_queries_total") for p in pages)
    assert hits[-1] == 0 + 64 + 64 + 48 + 80 + 4 * 64 and sum(hits[:-1]) == 0  # all on one worker
    assert queried[-1] == sum(len(p) for p, _ in cases) + 4 * 78 and sum(queried[:-1]) == 0
    assert len(pages) == (2 if mode == "disaggregated" else 1)
    assert max(value(p, "prefix_cache_blocks") for p in pages) > 0

def test_a_full_pool_evicts_and_reuses_pages_and_stays_exact():
    """A pool of 4 blocks: a chat that grows past it, a long prompt twice, a prompt_logprobs row
    extending the oldest chain, new prompts evicting old ones. Every prefill equals the whole one
    (the K/V read back from reused pages are the new blocks'), and nothing raises."""
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.sampling_params import SamplingParams

    model = load_model("demo", make_mesh(MeshConfig(1)))
    cached, plain = _runner(model, 5), _runner(model, 0)
    rng = np.random.default_rng(4)
    chat = rng.integers(3, 2048, 40).tolist()
    long_prompt = rng.integers(3, 2048, 100).tolist()
    steps = []
    for _ in range(4):  # a chat whose history grows by a turn each time
        chat = chat + rng.integers(3, 2048, 20).tolist()
        steps.append([chat])
    steps += [[long_prompt], [long_prompt], [rng.integers(3, 2048, 70).tolist(), chat[:50]]]
    for batch in steps:
        _assert_same_prefill(_prefill(cached, batch), _prefill(plain, batch), 2e-5)
    logprob_row = [SamplingParams(max_tokens=2, logprobs=5, prompt_logprobs=1)]
    for batch in ([chat + [9]], [long_prompt + [8]]):
        _assert_same_prefill(_prefill(cached, batch, logprob_row), _prefill(plain, batch, logprob_row), 2e-5)
    assert cached.prefix_cache.hit_tokens > 0 and len(cached.prefix_cache.index) <= 4
    pages = [b.page for b in cached.prefix_cache.index._by_id.values()]
    assert sorted(pages + cached.prefix_cache.index._free) == [1, 2, 3, 4]


def test_prefix_cache_metrics_are_counters_and_gauges_read_at_scrape_time():
    import types

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from splitserve.runtime.metrics import WorkerMetrics

    cache = types.SimpleNamespace(queried_tokens=0, hit_tokens=0, index=PrefixIndex(num_pages=9, block_size=4))
    metrics = WorkerMetrics()
    metrics.watch_prefix_cache(cache)
    cache.queried_tokens, cache.hit_tokens = 120, 48
    cache.index.store(list(range(12)), set())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert families["splitserve_prefix_cache_queries"].type == "counter"
    assert families["splitserve_prefix_cache_queries"].samples[0].value == 120
    assert families["splitserve_prefix_cache_hits"].samples[0].value == 48
    assert families["splitserve_prefix_cache_blocks"].samples[0].value == 3
    assert families["splitserve_prefix_cache_blocks_total"].samples[0].value == 8


def test_openai_usage_reports_cached_prompt_tokens_as_vllm_does():
    from splitserve.runtime import openai_api
    from splitserve.runtime.client_types import Chunk
    from splitserve.runtime.openai_stream import ChoiceCounts
    from splitserve.runtime.request import Completion

    def completion(cached):
        return Completion(text="x", token_ids=[5, 6], prompt_token_ids=list(range(40)), finish_reason="length",
                          ttft_s=0.1, latency_s=0.2, cached_prompt_tokens=cached)

    # Two prompts with n=2: the usage counts each prompt once, and its first sequence's cached tokens.
    body = openai_api.completion_body(False, "m", [[completion(32), completion(16)], [completion(16), completion(0)]])
    assert body["usage"] == {"prompt_tokens": 80, "completion_tokens": 8, "total_tokens": 88,
                             "prompt_tokens_details": {"cached_tokens": 48}}
    assert "prompt_tokens_details" not in openai_api.completion_body(False, "m", [[completion(0)]])["usage"]
    assert completion(32).to_json_dict()["cached_prompt_tokens"] == 32
    assert "cached_prompt_tokens" not in completion(0).to_json_dict()
    counts = ChoiceCounts(prompts=2, n=2)
    counts.add(0, Chunk([5], "a", None, list(range(40)), index=0, cached_prompt_tokens=32))
    counts.add(0, Chunk([5], "a", None, [], index=1, cached_prompt_tokens=16))
    counts.add(1, Chunk([5], "a", None, list(range(24)), index=0, cached_prompt_tokens=16))
    assert counts.usage() == (64, 3, 48)


@pytest.mark.parametrize("name", ["qwen2_gqa3_hd40_llama3rope", "llama_bias_mqa_hd24"])
def test_a_prefix_hit_matches_transformers_on_the_whole_prompt(hf_checkpoint, name):
    """Against something we did not write: after a hit, the first token's log-probabilities equal
    transformers' log-softmax at the whole prompt's last position, and greedy decoding equals
    transformers' generate() on the whole prompt."""
    import torch

    from hf_checkpoints import hf_greedy
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
    from splitserve.runtime.sampling_params import SamplingParams

    directory, torch_model = hf_checkpoint(name)
    vocab = torch_model.config.vocab_size
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    engine = ColocatedEngine(model, EngineConfig(num_pages=64, prefix_cache_pages=16))
    rng = np.random.default_rng(5)
    system = rng.integers(3, vocab, 50).tolist()
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5)
    engine.generate([system + rng.integers(3, vocab, 4).tolist()], params)  # stores the system prompt's blocks
    prompt = system + rng.integers(3, vocab, 11).tolist()
    (got,) = engine.generate([prompt], params)
    assert got.cached_prompt_tokens == 48
    with torch.no_grad():
        want = torch.log_softmax(torch_model(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
    top = np.argsort(-want)[:5]
    assert [t for t, _ in got.logprobs[0].top] == top.tolist()
    np.testing.assert_allclose([p for _, p in got.logprobs[0].top], want[top], atol=1e-4)
    assert got.token_ids == hf_greedy(torch_model, prompt, 8)
