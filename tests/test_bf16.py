"""bf16 serving runs and stays close to float32.

Agreement is measured teacher-forced: both dtypes see the same (float32 greedy) prefix
at every position, so one early disagreement does not count for all later tokens.
"""

import jax
import numpy as np
import pytest

from splitserve.models import serving
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams

NEW_TOKENS = 24


def next_token_argmax(model, sequence, prompt_len):
    """Argmax after each prefix sequence[:prompt_len + i], i < NEW_TOKENS, in one batched prefill."""
    rows = NEW_TOKENS
    tokens = np.zeros((rows, 128), np.int32)
    tokens[:, : len(sequence)] = sequence
    lengths = np.arange(prompt_len, prompt_len + rows, dtype=np.int32)
    logits, _, _ = jax.jit(lambda p, t, l: serving.prefill(model.graphdef, p, t, l))(model.params, tokens, lengths)
    return np.argmax(np.asarray(logits), axis=-1)


@pytest.mark.parametrize("name", ["llama3_gqa3_hd40_ropescale", "qwen3_qknorm_gqa3_hd40"])
def test_bf16_greedy_agrees_with_f32(hf_checkpoint, name, record_property):
    directory, _ = hf_checkpoint(name)
    f32 = load_model(str(directory), make_mesh(MeshConfig(1)), dtype="float32")
    bf16 = load_model(str(directory), make_mesh(MeshConfig(1)), dtype="bfloat16")
    assert bf16.params["layers"][0]["mlp"]["up_proj"][...].dtype == np.dtype("bfloat16")

    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, f32.config.vocab_size, size=n).tolist() for n in (6, 19, 40, 77)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    f32_out = ColocatedEngine(f32, EngineConfig(num_pages=64)).generate(prompts, greedy)
    bf16_out = ColocatedEngine(bf16, EngineConfig(num_pages=64)).generate(prompts, greedy)
    assert all(len(o.token_ids) == NEW_TOKENS for o in bf16_out)

    agree, total = 0, 0
    for prompt, out in zip(prompts, f32_out):
        sequence = prompt + out.token_ids
        ours = next_token_argmax(bf16, sequence, len(prompt))
        agree += int((ours == np.array(out.token_ids)).sum())
        total += NEW_TOKENS
    rate = agree / total
    free_running = np.mean([a.token_ids == b.token_ids for a, b in zip(f32_out, bf16_out)])
    record_property("bf16_teacher_forced_agreement", rate)
    print(f"\n{name}: bf16 teacher-forced greedy agreement {rate:.3f} ({agree}/{total}); "
          f"identical free-running sequences {free_running:.2f}")
    assert rate >= 0.9
