"""The Llama-family decoder as Flax NNX modules.

Families differ only by flags of ModelConfig (qkv bias, q/k norm, rope scaling, tied
embeddings). Attention itself is injected: each layer computes q, k, v and hands them to
an `attend(layer_index, q, k, v) -> out` callable, so prefill (flash attention over the
prompt) and decode (paged attention over the cache) share every other line.

Every parameter carries `logical_axes` metadata; models/sharding.py maps those names to
mesh axes. Weights are stored input-major (`x @ w`), heads unflattened:
    q_proj: [embed, heads, head_dim]   o_proj: [heads, head_dim, embed]
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from splitserve.models.config import ModelConfig
from splitserve.models.head_layout import HeadLayout
from splitserve.models.rope import apply_rope, inverse_frequencies

# attend(layer_index, q [b,t,heads,hd], k [b,t,kv_heads,hd], v) -> [b,t,heads,hd]
AttendFn = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale=0.02) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * scale, logical_axes=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype, axis_name: str | None):
        self.weight = _ones((size,), (axis_name,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in f32, then scale in the activation dtype, as transformers does.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        n, nkv = layout.num_heads, layout.num_kv_heads
        self.q_proj = _param(rngs, (d, n, hd), ("embed", "heads", "head_dim"), dtype)
        self.k_proj = _param(rngs, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = _param(rngs, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = _param(rngs, (n, hd, d), ("heads", "head_dim", "embed"), dtype)
        self.qkv_bias = cfg.qkv_bias
        if cfg.qkv_bias:
            self.q_bias = _zeros((n, hd), ("heads", "head_dim"), dtype)
            self.k_bias = _zeros((nkv, hd), ("kv_heads", "head_dim"), dtype)
            self.v_bias = _zeros((nkv, hd), ("kv_heads", "head_dim"), dtype)
        self.o_bias_enabled = cfg.o_bias
        if cfg.o_bias:
            self.o_bias = _zeros((d,), ("embed",), dtype)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, "head_dim")
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, "head_dim")
        self.rope = cfg.rope  # static: angles are trace-time constants

    def project_qkv(self, x_btd: jax.Array, positions_bt: jax.Array):
        q = jnp.einsum("btd,dnh->btnh", x_btd, self.q_proj[...])
        k = jnp.einsum("btd,dkh->btkh", x_btd, self.k_proj[...])
        v = jnp.einsum("btd,dkh->btkh", x_btd, self.v_proj[...])
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inverse_frequencies(self.rope, q.shape[-1])
        return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v

    def project_out(self, attn_btnh: jax.Array) -> jax.Array:
        out = jnp.einsum("btnh,nhd->btd", attn_btnh, self.o_proj[...])
        return out + self.o_bias[...] if self.o_bias_enabled else out


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (d, m), ("embed", "mlp"), dtype)
        self.up_proj = _param(rngs, (d, m), ("embed", "mlp"), dtype)
        self.down_proj = _param(rngs, (m, d), ("mlp", "embed"), dtype)
        self.bias = cfg.mlp_bias
        if cfg.mlp_bias:
            self.gate_bias = _zeros((m,), ("mlp",), dtype)
            self.up_bias = _zeros((m,), ("mlp",), dtype)
            self.down_bias = _zeros((d,), ("embed",), dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate = x_btd @ self.gate_proj[...]
        up = x_btd @ self.up_proj[...]
        if self.bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        out = (jax.nn.silu(gate) * up) @ self.down_proj[...]
        return out + self.down_bias[...] if self.bias else out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.attn = Attention(cfg, layout, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x_btd, positions_bt, attend_layer: Callable) -> jax.Array:
        q, k, v = self.attn.project_qkv(self.input_norm(x_btd), positions_bt)
        x_btd = x_btd + self.attn.project_out(attend_layer(q, k, v))
        return x_btd + self.mlp(self.post_attn_norm(x_btd))


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, 1.0)
        self.layers = nnx.List([DecoderLayer(cfg, layout, dtype, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens_bt, axis=0)

    def hidden_states(self, tokens_bt: jax.Array, positions_bt: jax.Array, attend: AttendFn) -> jax.Array:
        x = self.embed_tokens(tokens_bt)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions_bt, lambda q, k, v, i=i: attend(i, q, k, v))
        return self.final_norm(x)

    def logits(self, x_bd: jax.Array) -> jax.Array:  # -> f32[b, vocab]
        if self.config.tie_word_embeddings:
            return jnp.einsum("bd,vd->bv", x_bd, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("bd,dv->bv", x_bd, self.lm_head[...], preferred_element_type=jnp.float32)
