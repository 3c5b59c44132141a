"""Builds small random-weight HF checkpoints with transformers itself (the parity oracle)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# Odd configs per family: GQA with 3 KV heads, head_dim 40, rope scaling, tied/untied.
CONFIGS = {
    "llama3_gqa3_hd40_ropescale": dict(
        cls="LlamaConfig", hidden_size=120, num_attention_heads=6, num_key_value_heads=3, head_dim=40,
        intermediate_size=200, num_hidden_layers=2, vocab_size=320, max_position_embeddings=1024,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0, tie_word_embeddings=False,
    ),
    "llama2_mha_tied": dict(
        cls="LlamaConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=160, num_hidden_layers=2, vocab_size=300, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "mistral_gqa4_linear_rope": dict(
        cls="MistralConfig", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=1024,
        sliding_window=None, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen2_bias_mqa_tied": dict(
        cls="Qwen2Config", hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
        intermediate_size=192, num_hidden_layers=2, vocab_size=288, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "qwen3_qknorm_gqa3_hd40": dict(
        cls="Qwen3Config", hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=40,
        intermediate_size=160, num_hidden_layers=2, vocab_size=310, max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "llama_bias_mqa_hd24": dict(
        cls="LlamaConfig", hidden_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=24,
        intermediate_size=100, num_hidden_layers=2, vocab_size=280, max_position_embeddings=512,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
    ),
    "mistral_gqa3_hd40_tied": dict(
        cls="MistralConfig", hidden_size=120, num_attention_heads=6, num_key_value_heads=3, head_dim=40,
        intermediate_size=150, num_hidden_layers=2, vocab_size=270, max_position_embeddings=1024,
        sliding_window=None, tie_word_embeddings=True,
    ),
    "qwen2_gqa3_hd40_llama3rope": dict(
        cls="Qwen2Config", hidden_size=120, num_attention_heads=6, num_key_value_heads=3, head_dim=40,
        intermediate_size=150, num_hidden_layers=2, vocab_size=290, max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    ),
    "qwen3_bias_mqa_tied_linear_rope": dict(  # Qwen3's attention_bias covers o_proj too (Qwen2's does not)
        cls="Qwen3Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, num_hidden_layers=2, vocab_size=260, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 3.0}, attention_bias=True,
    ),
    "mistral_attention_bias_ignored": dict(  # transformers' Mistral has no biases, whatever the flag says
        cls="MistralConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, num_hidden_layers=1, vocab_size=200, max_position_embeddings=512,
        sliding_window=None, attention_bias=True,
    ),
}

MODEL_CLASSES = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
}


def build_checkpoint(name: str, out_dir: Path, seed: int = 0):
    """Saves a random-weight model with save_pretrained; returns the torch model (eval, f32)."""
    spec = dict(CONFIGS[name])
    cls_name = spec.pop("cls")
    config = getattr(transformers, cls_name)(**spec, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[cls_name])(config).eval()
    # Random non-trivial norms and biases, so a wrong mapping cannot hide behind ones/zeros.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p) if p.dim() > 1 and "embed" not in pname else torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers.generate, greedy, with EOS disabled (like our ignore_eos=True).

    min_new_tokens would instead suppress the EOS logit, which changes the argmax.
    """
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()
