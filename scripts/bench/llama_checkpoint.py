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
