"""HF checkpoint -> Orbax -> mesh: the same params and logits as loading the HF files directly."""

import os

# 8 fake CPU devices, before jax is imported (pytest imports every test module first).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_checkpoints import build_checkpoint
from splitserve.models import orbax_checkpoint
from splitserve.models.loader import load_model
from splitserve.models.metadata import ORBAX_MARKER
from splitserve.models.serving import prefill
from splitserve.models.sharding import MeshConfig, make_mesh

# mistral: 2 KV heads, tp=2 shards them (identity layout: direct sharded restore).
# qwen2: 1 KV head, biases, tied embeddings; tp=2 replicates the KV head (host remap path).
CONFIGS = ["mistral_gqa4_linear_rope", "qwen2_bias_mqa_tied"]


@pytest.fixture(scope="module", params=CONFIGS)
def converted(request, tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp(request.param)
    build_checkpoint(request.param, hf_dir)
    # Any tokenizer.json will do to check that it travels with the checkpoint.
    (hf_dir / "tokenizer.json").write_text(_tiny_tokenizer_json())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "a"}))
    (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (hf_dir / "additional_chat_templates").mkdir()  # as transformers 5 saves a named "tool_use" one
    (hf_dir / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    out = tmp_path_factory.mktemp("orbax") / request.param
    assert orbax_checkpoint.convert_to_orbax(str(hf_dir), out) == out.absolute()
    return hf_dir, out


CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
TOOL_TEMPLATE = "{% for t in tools %}{{ t.function.name }} {% endfor %}" + CHAT_TEMPLATE


def _tiny_tokenizer_json() -> str:
    import tokenizers

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tok.to_str()


def _last_logits(loaded, rows):
    seq = max(map(len, rows))
    tokens = np.zeros((len(rows), seq), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits, _, _ = prefill(loaded.graphdef, loaded.params, jnp.asarray(tokens),
                           jnp.asarray([len(r) for r in rows], jnp.int32))
    return np.asarray(logits)


def test_directory_contents(converted):
    hf_dir, out = converted
    marker = json.loads((out / ORBAX_MARKER).read_text())
    assert marker["format"] == "splitserve-orbax" and marker["version"] == 1
    assert marker["dtype"] == "float32"
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    # The chat template travels too, with the special tokens it reads.
    from splitserve.models.metadata import load_metadata

    chat = load_metadata(str(out)).chat_template
    assert chat.source == CHAT_TEMPLATE and chat.render([{"role": "user", "content": "b"}]) == "auser b "
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat.render([{"role": "user", "content": "b"}], tools=tools) == "f auser b "
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


@pytest.mark.parametrize("tp", [1, 2])
def test_orbax_matches_hf(converted, tp):
    hf_dir, out = converted
    mesh = make_mesh(MeshConfig(tp=tp))
    from_hf = load_model(str(hf_dir), mesh)
    from_orbax = load_model(str(out), mesh)  # dispatches on the marker
    assert from_orbax.config == from_hf.config
    assert from_orbax.layout == from_hf.layout
    assert from_orbax.tokenizer is not None and from_orbax.tokenizer.encode("a b") == [1, 2]
    # Same arrays, with the same shardings (the restore put them straight on the mesh).
    hf_leaves = jax.tree.leaves(nnx.to_pure_dict(from_hf.params))
    ob_leaves = jax.tree.leaves(nnx.to_pure_dict(from_orbax.params))
    assert len(hf_leaves) == len(ob_leaves)
    for a, b in zip(hf_leaves, ob_leaves):
        assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vocab = from_hf.config.vocab_size
    rows = [[1, 5, 9, 33, 7], [3, vocab - 1, 2]]
    np.testing.assert_allclose(_last_logits(from_orbax, rows), _last_logits(from_hf, rows),
                               rtol=1e-6, atol=1e-6)


def test_bfloat16_conversion_loads_as_bfloat16(tmp_path):
    hf_dir = tmp_path / "hf"
    build_checkpoint("llama3_gqa3_hd40_ropescale", hf_dir)
    out = orbax_checkpoint.convert_to_orbax(str(hf_dir), tmp_path / "orbax", dtype="bfloat16")
    assert json.loads((out / ORBAX_MARKER).read_text())["dtype"] == "bfloat16"
    mesh = make_mesh(MeshConfig(tp=2))  # 3 KV heads on tp=2: replicated, host remap path
    loaded = load_model(str(out), mesh)
    assert loaded.dtype == jnp.bfloat16 and not loaded.layout.is_identity
    reference = load_model(str(hf_dir), mesh, dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(reference.params)),
                    jax.tree.leaves(nnx.to_pure_dict(loaded.params))):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refuses_nonempty_out_dir_and_reconversion(converted, tmp_path):
    hf_dir, out = converted
    (tmp_path / "x").write_text("occupied")
    with pytest.raises(FileExistsError):
        orbax_checkpoint.convert_to_orbax(str(hf_dir), tmp_path)
    with pytest.raises(ValueError, match="already"):
        orbax_checkpoint.convert_to_orbax(str(out), tmp_path / "again")


def test_a_truncated_data_file_is_a_value_error_naming_the_checkpoint(converted, tmp_path):
    """TensorStore raised a bare Exception (hundreds of lines from `generate`), on both restore paths."""
    import shutil

    _, out = converted
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    data = max((p for p in (damaged / "params").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])
    for tp in (1, 2):  # the sharded restore, and (qwen2's 1 KV head on tp=2) the host remap
        with pytest.raises(ValueError, match="the Orbax checkpoint does not restore"):
            load_model(str(damaged), make_mesh(MeshConfig(tp=tp)))


@pytest.mark.parametrize("file, text, message", [
    (ORBAX_MARKER, "{not json", "splitserve_orbax.json: not JSON"),
    (ORBAX_MARKER, "[1]", "splitserve_orbax.json: must hold a JSON object"),
    (ORBAX_MARKER, '{"format": "splitserve-orbax", "version": 1}', "\"name\" must be the model's name"),
    ("model_config.json", '{"family": "llama"}', "model_config.json: missing 'rope'"),
    ("model_config.json", "", "model_config.json: not JSON"),
    ("model_config.json", None, "model_config.json: cannot be read \\(No such file"),
    (ORBAX_MARKER, '{"format": "splitserve-orbax", "version": true, "name": "m"}', "version True; this splitserve"),
])
def test_a_damaged_marker_or_config_is_a_value_error_naming_the_file(converted, tmp_path, file, text, message):
    """They were KeyErrors and JSON tracebacks, in the router (load_metadata) and in the workers (load_model)."""
    import shutil

    from splitserve.models.metadata import load_metadata

    _, out = converted
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    if text is None:
        (damaged / file).unlink()
    else:
        (damaged / file).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_metadata(str(damaged))
    with pytest.raises(ValueError, match=message):
        load_model(str(damaged), make_mesh(MeshConfig(tp=1)))
