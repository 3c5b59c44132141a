"""The model with the Pallas kernels: the TPU kernels (TPU interpret mode) per shard of a tp=2
mesh, and the GPU kernels compiled on a real GPU (SPLITSERVE_TEST_PLATFORM=cuda)."""

import jax
import numpy as np
import pytest
import torch
from jax.experimental.pallas import tpu as pltpu

from hf_checkpoints import hf_greedy
from test_kernels_common import ON_GPU
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams


def test_tpu_kernels_in_the_model_on_tp2_give_transformers_tokens(hf_checkpoint):
    directory, torch_model = hf_checkpoint("mistral_gqa4_linear_rope")  # 8 heads / 2 KV heads
    model = load_model(str(directory), make_mesh(MeshConfig(2)))
    prompts = [np.random.default_rng(7).integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 20)]
    engine = ColocatedEngine(model, EngineConfig(page_size=8, num_pages=16, max_batch=2, attention_impl="tpu"))
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        outs = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(torch_model, p, 4) for p in prompts]


def _check_a_prefix_hit(torch_model, model, impl):
    """After a prefix hit (the flash kernel with the prefix's length as its query offset), the first
    token's log-probabilities and the greedy tokens equal transformers' on the whole prompt."""
    rng = np.random.default_rng(9)
    system = rng.integers(3, model.config.vocab_size, size=21).tolist()  # 2 whole blocks of 8, and 5
    prompts = [system + rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (3, 12)]
    engine = ColocatedEngine(model, EngineConfig(page_size=8, num_pages=16, max_batch=2, attention_impl=impl,
                                                 prefix_cache_pages=8))
    params = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=5)
    engine.generate([system], params)  # stores the system prompt's whole blocks
    outs = engine.generate(prompts, params)
    assert [o.cached_prompt_tokens for o in outs] == [16, 16]
    assert [o.token_ids for o in outs] == [hf_greedy(torch_model, p, 3) for p in prompts]
    for out, prompt in zip(outs, prompts):
        with torch.no_grad():
            want = torch.log_softmax(torch_model(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
        top = np.argsort(-want)[:5]
        assert [t for t, _ in out.logprobs[0].top] == top.tolist()
        np.testing.assert_allclose([p for _, p in out.logprobs[0].top], want[top], atol=1e-4)


def test_tpu_kernels_after_a_cached_prefix_give_transformers_tokens_on_tp2(hf_checkpoint):
    directory, torch_model = hf_checkpoint("mistral_gqa4_linear_rope")
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        _check_a_prefix_hit(torch_model, load_model(str(directory), make_mesh(MeshConfig(2))), "tpu")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (SPLITSERVE_TEST_PLATFORM=cuda)")
def test_gpu_kernels_after_a_cached_prefix_give_transformers_tokens(hf_checkpoint):
    directory, torch_model = hf_checkpoint("mistral_gqa4_linear_rope")
    with jax.default_matmul_precision("highest"):  # as below: TF32 is not what this test is about
        _check_a_prefix_hit(torch_model, load_model(str(directory), make_mesh(MeshConfig(1))), "gpu")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (SPLITSERVE_TEST_PLATFORM=cuda)")
def test_gpu_kernels_in_the_model_give_transformers_tokens(hf_checkpoint):
    directory, torch_model = hf_checkpoint("mistral_gqa4_linear_rope")
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    prompts = [np.random.default_rng(8).integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 20, 37)]
    engine = ColocatedEngine(model, EngineConfig(page_size=8, num_pages=32, max_batch=4, attention_impl="gpu"))
    # Full f32 products in the rest of the model too: XLA's GPU default is TF32, which is not what
    # this test is about and can flip a greedy choice of a random model.
    with jax.default_matmul_precision("highest"):
        outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(torch_model, p, 6) for p in prompts]
