"""The benchmarks' ~30M-parameter random Llama, saved by transformers itself (no download).

    from llama_checkpoint import LLAMA_30M, build_hf_llama   # scripts/bench/ is on sys.path
    num_params = build_hf_llama(out_dir)                     # float32 safetensors + config.json

Shapes (30.4M parameters, 122 MB in float32): hidden 512, 7 layers, 8 query / 4 KV heads of 64,
MLP 1536, vocab 8192, untied embeddings. No tokenizer: the benchmarks send token ids.
"""

from __future__ import annotations

from pathlib import Path

LLAMA_30M = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=7, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


def build_hf_llama(out_dir: Path, config: dict | None = None, seed: int = 0) -> int:
    """Saves a random float32 LlamaForCausalLM (transformers' own init) to out_dir; returns its parameter count."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(config or LLAMA_30M))).float().eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


# TinyLlama-1.1B's shapes (Llama 2 architecture): 1.10B parameters, hidden 2048, 22 layers,
# 32 query / 4 KV heads of 64, MLP 5632, vocab 32000, untied. For the GPU roofline.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


def build_random_llama(out_dir: Path, config: dict, seed: int = 0) -> int:
    """Saves a random float16 Llama checkpoint in HF's layout with numpy alone; returns its parameter count.

    For models too large to build quickly through transformers on a CPU (a 1B model takes torch
    minutes to initialise): the tensor names and shapes are HF's, the values N(0, 0.02) (norm
    weights 1), so the loader reads it like any HF checkpoint. Nothing here is a parity oracle.
    """
    import json

    import numpy as np
    import safetensors.numpy

    rng = np.random.default_rng(seed)
    d, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = d // heads

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": normal(vocab, d), "model.norm.weight": np.ones(d, np.float16)}
    if not config.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = normal(vocab, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(d, np.float16),
            p + "post_attention_layernorm.weight": np.ones(d, np.float16),
            p + "self_attn.q_proj.weight": normal(heads * hd, d),
            p + "self_attn.k_proj.weight": normal(kv_heads * hd, d),
            p + "self_attn.v_proj.weight": normal(kv_heads * hd, d),
            p + "self_attn.o_proj.weight": normal(d, heads * hd),
            p + "mlp.gate_proj.weight": normal(inter, d),
            p + "mlp.up_proj.weight": normal(inter, d),
            p + "mlp.down_proj.weight": normal(d, inter),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out_dir / "model.safetensors"))
    hf_config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                     rope_theta=10000.0, torch_dtype="float16", **config)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=1))
    return sum(t.size for t in tensors.values())
