"""The built-in demo model: a small Llama built deterministically on first use, no download.

    ensure_demo_model() -> $SPLITSERVE_CACHE/demo-v2   (default ~/.cache/splitserve/demo-v2)

The directory is an ordinary HF LlamaForCausalLM checkpoint (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json and a
chat template in chat_template.jinja), so transformers can load it as a parity oracle.
Its tokenizer is a real byte-level BPE trained on the shipped demo_corpus.txt; its weights are random (numpy RandomState, fixed seed), so it speaks
fluent nonsense. Every build of the same version gives the same bytes, on any machine:
the RandomState stream and the BPE trainer are deterministic and nothing variable
(timestamps, paths, versions) is written.

Concurrent first uses are safe: each process builds into its own temp dir next to the
target and renames it into place; a rename onto an existing directory fails, so the
first finisher wins and the others discard their copies. Change DEMO_VERSION whenever
the output would change, so stale caches are never mixed with new code.

This module imports no JAX: a worker can build the cache before its devices come up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

DEMO_VERSION = "demo-v2"
SEED = 20240611
CORPUS = Path(__file__).with_name("demo_corpus.txt")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
INIT_STD = 0.02
# A chat template in the style of Zephyr's, so that chat requests (the SDK's messages, batch
# /v1/chat/completions lines) work on the demo model as on an instruction-tuned checkpoint.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

# The corpus (~35 KB) yields exactly 2048 BPE tokens, so vocab == tokenizer size (no dead ids).
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "_name_or_path": "splitserve-demo-v2",
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": INIT_STD,
    "torch_dtype": "float32",
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}


def default_cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve")


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Returns `cache_dir/demo-v2` (cache_dir defaults to $SPLITSERVE_CACHE), building it once."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / DEMO_VERSION
    if target.is_dir():
        return target  # only ever appears complete, via rename
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-build-", dir=root))
    try:
        build_demo_model(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise  # not a lost race: a real failure
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def build_demo_model(out_dir: Path) -> None:
    """Writes the demo checkpoint's files into the existing directory `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(CORPUS.read_text(encoding="utf-8"), HF_CONFIG["vocab_size"])
    if tokenizer.get_vocab_size() != HF_CONFIG["vocab_size"]:
        raise RuntimeError(f"demo tokenizer has {tokenizer.get_vocab_size()} tokens, "
                           f"expected {HF_CONFIG['vocab_size']}; was demo_corpus.txt changed?")
    _write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": HF_CONFIG["max_position_embeddings"],
    })
    _write_text(out_dir / "chat_template.jinja", CHAT_TEMPLATE)
    _write_json(out_dir / "config.json", HF_CONFIG)
    _write_json(out_dir / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    path = out_dir / "model.safetensors"
    safetensors.numpy.save_file(random_weights(HF_CONFIG, SEED), str(path), metadata={"format": "pt"})
    _fsync(path)


def train_tokenizer(corpus: str, vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style) with <s> prepended to every encoding."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.split("\n\n"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    for token, expected in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID)):
        if tok.token_to_id(token) != expected:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {expected}")
    return tok


def random_weights(hf: dict, seed: int) -> dict[str, np.ndarray]:
    """HF-named f32 tensors ([out, in] for projections), drawn in a fixed order."""
    rng = np.random.RandomState(seed)
    d, hd, m, v = hf["hidden_size"], hf["head_dim"], hf["intermediate_size"], hf["vocab_size"]
    n, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]

    def normal(*shape):
        return (rng.standard_normal(shape) * INIT_STD).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, d)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(n * hd, d)
        w[p + "self_attn.k_proj.weight"] = normal(nkv * hd, d)
        w[p + "self_attn.v_proj.weight"] = normal(nkv * hd, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, n * hd)
        w[p + "mlp.gate_proj.weight"] = normal(m, d)
        w[p + "mlp.up_proj.weight"] = normal(m, d)
        w[p + "mlp.down_proj.weight"] = normal(d, m)
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    w["model.norm.weight"] = np.ones(d, np.float32)
    w["lm_head.weight"] = normal(v, d)
    return w


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
