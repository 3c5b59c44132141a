"""What the loader does with checkpoints it cannot serve as they are: float16 weights (served in
bfloat16, checked against transformers), quantized or non-float tensors, a tied config with a
different lm_head in the file, tensors of the wrong shape. Each used to load silently wrong or
fail only at the first request."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_checkpoints import build_checkpoint
from splitserve.models import serving
from splitserve.models.config import config_from_hf, serving_dtype_name
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, model_type="llama")


def _load(directory, dtype="auto"):
    return load_model(str(directory), make_mesh(MeshConfig(1)), dtype=dtype)


def _rewrite(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_float16_checkpoint_is_served_in_bfloat16_and_matches_transformers(tmp_path):
    torch_model = build_checkpoint("llama3_gqa3_hd40_ropescale", tmp_path).half()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    model = _load(tmp_path)  # --dtype auto: it loaded as float16, and the kernels refused it at the first prefill
    assert model.dtype == np.dtype("bfloat16")
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, size=21).tolist()
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :21] = prompt
    logits, _, _ = jax.jit(lambda p, t, n: serving.prefill(model.graphdef, p, t, n))(
        model.params, tokens, np.array([21], np.int32))
    with torch.no_grad():  # the float16 weights, computed in float32
        ref = torch_model.float()(torch.tensor([prompt])).logits[0, -1].numpy()
    ours = np.asarray(logits[0], np.float64)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 3e-2  # what bfloat16 costs (tests/test_bf16.py)
    out = ColocatedEngine(model, EngineConfig(page_size=8, num_pages=32)).generate(
        [prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_serving_dtypes():
    config = config_from_hf(dict(BASE, torch_dtype="float16"))
    assert serving_dtype_name("auto", config) == "bfloat16"
    assert serving_dtype_name("float32", config) == "float32"
    with pytest.raises(ValueError, match="served in bfloat16 under auto"):
        serving_dtype_name("float16", config)
    with pytest.raises(ValueError, match="stored as 'float64'.*pass --dtype float32 or bfloat16"):
        serving_dtype_name("auto", config_from_hf(dict(BASE, torch_dtype="float64")))


@pytest.mark.parametrize("field, message", [
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
     "quantized checkpoints are not supported \\(quantization_config: bitsandbytes\\)"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),  # it was served as silu
])
def test_config_fields_the_decoder_does_not_implement_are_refused(field, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(dict(BASE, **field))
    assert config_from_hf(dict(BASE, hidden_act="silu")).family == "llama"


def test_weights_stored_as_integers_are_refused_by_name(tmp_path):
    build_checkpoint("llama2_mha_tied", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(tmp_path, lambda t: t.update({name: np.clip(t[name] * 100, -127, 127).astype(np.int8)}))
    with pytest.raises(ValueError, match=f"tensor '{name}' is stored as int8"):
        _load(tmp_path)


def test_a_tied_config_with_a_different_lm_head_in_the_file_is_refused(tmp_path):
    build_checkpoint("llama2_mha_tied", tmp_path)
    embed = load_file(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"]
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embed.copy()}))
    _load(tmp_path)  # the same matrix saved twice: fine
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embed[::-1].copy()}))
    with pytest.raises(ValueError, match="holds an lm_head.weight that differs"):
        _load(tmp_path)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    build_checkpoint("llama2_mha_tied", tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(tmp_path, lambda t: t.update({name: t[name][:32].copy()}))
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(32, 64\\), but config.json implies \\(64, 64\\)"):
        _load(tmp_path)


def test_an_o_proj_of_the_wrong_shape_but_the_right_size_is_named(tmp_path):
    """It was reshaped as it came: served as a wrong model without a word."""
    build_checkpoint("llama2_mha_tied", tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(tmp_path, lambda t: t.update({name: t[name].reshape(32, 128).copy()}))
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(32, 128\\), but config.json implies \\(64, 64\\)"):
        _load(tmp_path)


def test_layers_past_num_hidden_layers_are_refused_not_dropped(tmp_path):
    build_checkpoint("llama2_mha_tied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=config["num_hidden_layers"] - 1)))
    with pytest.raises(ValueError, match="holds layers past config.json's num_hidden_layers=1 "
                                         "\\(model.layers.1.input_layernorm.weight, 9 tensors in all\\)"):
        _load(tmp_path)


def test_a_legacy_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it():
    """transformers 5 writes rope_parameters; a rope_scaling beside it wins there, and was ignored here."""
    linear = config_from_hf(dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                 rope_scaling={"type": "linear", "factor": 4.0}))
    assert (linear.rope.rope_type, linear.rope.factor, linear.rope.theta) == ("linear", 4.0, 5e5)
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf(dict(BASE, rope_parameters={"rope_type": "default"},
                            rope_scaling={"rope_type": "yarn", "factor": 4.0}))


@pytest.mark.parametrize("file, content, message", [
    ("config.json", "[1, 2]", "config.json: must hold a JSON object, got list"),
    ("config.json", "{not json", "config.json: not JSON"),
    ("config.json", None, "config.json has no 'hidden_size' field"),
    ("generation_config.json", '{"eos_token_id": 99999}', "eos_token_id \\[99999\\] is outside the vocabulary"),
    ("generation_config.json", '{"eos_token_id": "</s>"}', "eos_token_id must be a token id or a list of them"),
    ("model.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "tensor 'model.embed_tokens.weight' is missing"),
    ("model.safetensors", b"", "model.safetensors: not a readable safetensors file"),
    ("tokenizer.json", "{not json", "tokenizer.json does not load"),
])
def test_a_damaged_checkpoint_file_is_a_one_line_error_naming_it(tmp_path, file, content, message):
    """Each was a KeyError, TypeError, SafetensorError or bare Exception traceback from `generate`."""
    build_checkpoint("llama2_mha_tied", tmp_path)
    path = tmp_path / file
    if content is None:  # a required field left out
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "hidden_size"}))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        _load(tmp_path)
