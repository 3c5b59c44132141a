"""After a full warm-up, serving any prompt or context length compiles nothing."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.host_kv import PrefilledRow
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.sampling_params import SamplingParams

# A program compiled, or read from JAX's persistent compile cache (conftest turns it on): either way
# one that warm-up did not leave in the runner's own jit caches.
COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: COMPILES.append(name)
    if name.endswith(("backend_compile_duration", "cache_retrieval_time_sec")) else None)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def runner(request, tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    model = load_model("demo", make_mesh(MeshConfig(request.param)))
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, max_model_len=64))  # few buckets
    return ModelRunner(model, RunnerConfig(page_size=16, num_pages=40, max_batch=8, max_prefill_batch=2))


def test_serving_after_full_warm_up_compiles_nothing(runner):
    programs = runner.warm_up(decode=True, full=True)
    assert programs >= 2 * 3 * 4  # (batch 1, 2) x (prompt 16, 32, 64) x (embed, layer, logits, insert) + more
    COMPILES.clear()
    rng = np.random.default_rng(0)
    greedy = SamplingParams(max_tokens=4)
    # min_tokens, logprobs, penalties and structured outputs take other branches of the same
    # programs (and a zeroing of penalty rows, a setting of prompt flags, a write of token masks):
    # served too, they must not compile either.
    featured = [SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(5,), logprobs=3, frequency_penalty=1.0),
                SamplingParams(max_tokens=4, logprobs=0, repetition_penalty=1.3, logit_bias={7: 2.0}),
                SamplingParams(max_tokens=4, allowed_token_ids=(5, 9, 11)),
                SamplingParams(max_tokens=4, structured_outputs={"regex": "[a-z ]+"})]
    next_page = 1
    for step in range(8):
        batch = int(rng.integers(1, 3))
        lengths = [int(n) for n in rng.integers(1, 61, size=batch)]
        prompts = [list(rng.integers(3, 2000, size=n)) for n in lengths]
        params = [featured[step // 2 % 4] if step % 2 else greedy] + [greedy] * (batch - 1)
        first, ks, vs, _ = runner.prefill(prompts, params, [0] * batch)
        pages = []
        for n in lengths:
            count = -(-(n + 4) // 16)
            pages.append(list(range(next_page, next_page + count)))
            next_page = 1 + (next_page + count) % 30
        # one request arrives as host arrays (transferred), the others stay on this device
        kvs = [runner.kv_to_host(ks, vs, 0, lengths[0])] + [PrefilledRow(ks, vs, r, lengths[r]) for r in range(1, batch)]
        runner.insert_kv(kvs, pages, lengths)
        runner.decode(first, lengths, pages, params, [1] * batch, request_ids=[f"{step}-{r}" for r in range(batch)],
                      prompts=prompts)
    assert COMPILES == [], f"{len(COMPILES)} programs compiled while serving after warm-up"


def test_cpu_prompt_buckets_are_fine_and_the_kernels_keep_powers_of_two(runner):
    """On a CPU prefill time follows the padded tokens, so prompts pad to 1.5x steps as well; the
    Pallas kernels' tiles stay powers of two."""
    cpu = ModelRunner(runner.model, dataclasses.replace(runner.config, num_pages=2, attention_impl="xla"))
    assert cpu.prompt_buckets() == [16, 24, 32, 48, 64]
    assert [cpu.padded_prompt_len(n) for n in (1, 17, 25, 40, 49)] == [16, 24, 32, 48, 64]
    kernels = ModelRunner(runner.model, dataclasses.replace(runner.config, num_pages=2, attention_impl="tpu"))
    assert kernels.prompt_buckets() == [16, 32, 64] and kernels.padded_prompt_len(40) == 64


def test_a_prefix_caching_prefill_worker_compiles_nothing_until_a_hit(runner):
    """Every prefill stores its prompts' new blocks in the prefix pool: warm-up compiles that write
    for every (batch, prompt) bucket. (A prefill after a cached prefix compiles on first use.)"""
    cached = ModelRunner(runner.model, dataclasses.replace(runner.config, decodes=False, num_pages=2,
                                                           prefix_cache_pages=16))
    cached.warm_up(decode=False, full=True)
    COMPILES.clear()
    rng = np.random.default_rng(1)
    for batch, n in ((1, 20), (2, 64), (1, 33), (2, 5)):
        prompts = [list(rng.integers(3, 2000, size=n)) for _ in range(batch)]
        cached.prefill(prompts, [SamplingParams(max_tokens=2)] * batch, [0] * batch)
    assert cached.prefix_cache.hit_tokens == 0 and len(cached.prefix_cache.index) > 0
    assert COMPILES == [], f"{len(COMPILES)} programs compiled while serving after warm-up"


def test_chunked_prefill_after_full_warm_up_compiles_nothing(runner):
    """Every chunk program of every prompt width past a chunk: first chunks of any length, full chunks."""
    chunked = ModelRunner(runner.model, dataclasses.replace(runner.config, decodes=False, num_pages=2,
                                                            prefill_chunk_tokens=16))
    chunked.warm_up(decode=False, full=True)
    COMPILES.clear()
    rng = np.random.default_rng(2)
    for n in (17, 20, 32, 33, 47, 49, 64):
        params = SamplingParams(max_tokens=2, logprobs=2 if n % 2 else None)
        prompt = list(rng.integers(3, 2000, size=n))
        assert chunked.chunked.wants(prompt, params)
        for _ in chunked.chunked.run(prompt, params, 0):
            pass
    assert COMPILES == [], f"{len(COMPILES)} programs compiled while serving after warm-up"
