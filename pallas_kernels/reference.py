"""Plain-JAX reference attention with the same signatures as the Pallas kernels.

These are the ground truth the kernels are tested against and the path the model
uses on CPU. They favour clarity over speed: GQA is expressed by grouping query
heads ([kv_heads, group]) so K/V are never repeated, and every masked K/V row is
zeroed as well as its score, so NaN in padding or foreign pages cannot leak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30
# Ground truth: full f32 products even where a backend's default is bf16 or TF32 passes.
_HIGHEST = jax.lax.Precision.HIGHEST


def flash_attention_reference(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    *,
    lengths: jax.Array | None = None,  # i32[batch]
    causal: bool = True,
    sm_scale: float | None = None,
    q_offsets: jax.Array | None = None,  # i32[batch]; None: q_seq == seq, queries from position 0
) -> jax.Array:  # [batch, q_seq, heads, head_dim], q.dtype
    batch, q_seq, heads, head_dim = q.shape
    seq, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    q_btkgh = q.reshape(batch, q_seq, kv_heads, group, head_dim).astype(jnp.float32)
    k_f32 = k.astype(jnp.float32)
    scores = jnp.einsum("bqkgh,bskh->bkgqs", q_btkgh, k_f32, precision=_HIGHEST) * scale

    key_pos = jnp.arange(seq)
    # Offsets clipped as the kernels clip them: past seq every query is padding, below 0 counts as 0.
    starts = jnp.zeros((batch,), jnp.int32) if q_offsets is None else jnp.clip(q_offsets, 0, seq)
    query_pos = starts[:, None] + jnp.arange(q_seq)[None, :]  # [batch, q]
    valid = jnp.ones((batch, q_seq, seq), dtype=bool)
    if causal:
        valid = key_pos[None, None, :] <= query_pos[:, :, None]
    valid_bs = jnp.ones((batch, seq), dtype=bool)
    if lengths is not None:
        valid_bs = key_pos[None, :] < lengths[:, None]
    valid = valid & valid_bs[:, None, :]  # [batch, q, s]

    scores = jnp.where(valid[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(valid[:, None, None], probs, 0.0)
    v_safe = jnp.where(valid_bs[:, :, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v_safe, precision=_HIGHEST)
    return out.reshape(batch, q_seq, heads, head_dim).astype(q.dtype)


def paged_attention_reference(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # i32[batch], tokens in the cache including the new one
    page_indices: jax.Array,  # i32[batch, pages_per_sequence]
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [batch, heads, head_dim], q.dtype
    batch, heads, head_dim = q.shape
    kv_heads, total_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_indices.shape[1]
    # Page ids outside [0, total_pages) (a caller's bug) are clipped, in every implementation
    # alike: the kernels must never read outside the cache.
    page_indices = jnp.clip(page_indices, 0, total_pages - 1)
    group = heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    max_len = pages_per_seq * page_size

    def gather(pages):  # -> [batch, kv_heads, max_len, head_dim]
        g = pages[:, page_indices]  # [kv_heads, batch, pages_per_seq, page_size, head_dim]
        return jnp.swapaxes(g, 0, 1).reshape(batch, kv_heads, max_len, head_dim)

    valid = jnp.arange(max_len)[None, :] < lengths[:, None]  # [batch, max_len]
    k = jnp.where(valid[:, None, :, None], gather(k_pages).astype(jnp.float32), 0.0)
    v = jnp.where(valid[:, None, :, None], gather(v_pages).astype(jnp.float32), 0.0)

    q_bkgh = q.reshape(batch, kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bkgh,bksh->bkgs", q_bkgh, k, precision=_HIGHEST) * scale
    scores = jnp.where(valid[:, None, None, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgs,bksh->bkgh", probs, v, precision=_HIGHEST)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
