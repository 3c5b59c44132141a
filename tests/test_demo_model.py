"""The built-in demo model: built deterministically, loadable, and equal to transformers."""

import os

# 8 fake CPU devices, before jax is imported (pytest imports every test module first).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from splitserve.models import demo
from splitserve.models.loader import load_model
from splitserve.models.serving import prefill
from splitserve.models.sharding import MeshConfig, make_mesh

TEXTS = [
    "The weather today is cool, and the soup is ready.",
    "Prefill workers hand the KV cache to decode workers.",
    "Unicode survives too: naïve café, 雨, 🌧️ — and   odd  spacing\n\ttabs.",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SPLITSERVE_CACHE")
    os.environ["SPLITSERVE_CACHE"] = str(cache)
    try:
        path = demo.ensure_demo_model()
        assert path == cache / demo.DEMO_VERSION
        yield path
    finally:
        if old is None:
            del os.environ["SPLITSERVE_CACHE"]
        else:
            os.environ["SPLITSERVE_CACHE"] = old


@pytest.fixture(scope="module")
def loaded(demo_dir):
    return load_model("demo", make_mesh(MeshConfig(tp=1)))  # goes through SPLITSERVE_CACHE


def test_files_and_config(demo_dir, loaded):
    names = sorted(p.name for p in demo_dir.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    hf = json.loads((demo_dir / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["torch_dtype"] == "float32"
    cfg = loaded.config
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 4, 8, 4)
    assert cfg.vocab_size == loaded.tokenizer.vocab_size == 2048
    assert cfg.bos_token_id == demo.BOS_ID and cfg.eos_token_ids == (demo.EOS_ID,)
    assert loaded.dtype == jnp.float32 and loaded.layout.is_identity


def test_tokenizer_round_trip(loaded):
    tok = loaded.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == demo.BOS_ID and demo.BOS_ID not in ids[1:]
        assert tok.decode(ids) == text
    # A trained BPE, not bytes: common corpus words are single tokens.
    assert len(tok.encode("The weather", add_special_tokens=False)) == 2


def test_chat_template_renders_as_transformers_renders_it(demo_dir, loaded):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The weather?"}]
    text = loaded.chat_template.render(messages)
    assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|system|>\nBe brief.</s>\n") and text.endswith("<|assistant|>\n")


def test_transformers_parity(demo_dir, loaded):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(demo_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    rows = [loaded.tokenizer.encode(t) for t in TEXTS]
    assert [hf_tok(t).input_ids for t in TEXTS] == rows
    seq = max(map(len, rows))
    tokens = np.zeros((len(rows), seq), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits, _, _ = prefill(loaded.graphdef, loaded.params, jnp.asarray(tokens),
                           jnp.asarray([len(r) for r in rows], jnp.int32))
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf_model(torch.tensor([r])).logits[0, -1].numpy()
        got = np.asarray(logits[i])
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_build_is_byte_identical_and_race_safe(demo_dir, tmp_path):
    # Three processes race to build the same cache dir; all must get one complete copy.
    code = "import sys; from splitserve.models.demo import ensure_demo_model; print(ensure_demo_model(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [str(tmp_path / demo.DEMO_VERSION)] * 3
    assert [p.name for p in tmp_path.iterdir()] == [demo.DEMO_VERSION]  # no temp dirs left
    for f in demo_dir.iterdir():
        assert (tmp_path / demo.DEMO_VERSION / f.name).read_bytes() == f.read_bytes(), f.name
