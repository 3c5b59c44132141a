"""Flash-decoding over a paged KV cache for GPU (Pallas, Triton lowering).

Decode has one query token, so a (sequence, KV head) pair alone cannot fill a GPU.
The page list of each sequence is cut into `num_splits` contiguous ranges and each
range gets its own program; a plain-JAX epilogue merges the partial results by
their log-sum-exp:

    grid (batch, kv_heads, num_splits):
        for blocks of `pages_per_compute_block` pages in this split, below the length:
            k, v = gather pages (page ids past the length are replaced by page 0)
            online softmax with scores AND V rows past the length masked
        write acc (unnormalised), m (row max), l (row sum)
    combine: w_s = exp(m_s - max_s m_s); out = sum_s w_s acc_s / sum_s w_s l_s

All query heads of a KV head form one [group_pad, head_dim] tile (group padded to a
power of two >= 16, as tl.dot needs). Triton tiles must be powers of two: page_size
must be one, and a head_dim that is not is padded, which copies the cache (slow;
meant for odd test shapes, not production models).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from splitserve.pallas_kernels._util import (
    traced_in_32_bits,
    MASK_VALUE,
    default_scale,
    dot_precision,
    interpret_arg,
    next_power_of_2,
    pad_axis,
    round_up,
)

_TARGET_PROGRAMS = 264  # about two waves on a 132-SM H100


def _dot(a, b, *, trans_b=False):
    return pltr.dot(a, b, trans_b=trans_b, precision=dot_precision(a.dtype)).astype(jnp.float32)


def _decode_kernel(
    lengths_ref,  # i32[1]
    pages_ref,  # i32[pages_per_split], this split's page ids
    q_ref,  # [group_pad, head_dim]
    k_ref,  # [total_pages, page_size, head_dim] of this KV head
    v_ref,  # [total_pages, page_size, head_dim]
    acc_ref,  # f32[group_pad, head_dim]
    m_ref,  # f32[group_pad]
    l_ref,  # f32[group_pad]
    *,
    sm_scale: float,
    ppcb: int,
    pages_per_split: int,
):
    split = pl.program_id(2)
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    block_tokens = ppcb * page_size
    length = lengths_ref[0]
    num_pages = pl.cdiv(length, page_size)
    first_page = split * pages_per_split
    my_pages = jnp.clip(num_pages - first_page, 0, pages_per_split)
    q = q_ref[...]
    group_pad = q.shape[0]

    def body(i, carry):
        acc, m, l = carry
        page0 = first_page + i * ppcb
        ids = pages_ref[pl.ds(i * ppcb, ppcb)]
        # Page ids past the length may be garbage: never dereference them.
        ids = jnp.where(page0 + jnp.arange(ppcb) < num_pages, ids, 0)
        k = k_ref[ids].reshape(block_tokens, head_dim)
        v = v_ref[ids].reshape(block_tokens, head_dim)
        s = _dot(q, k, trans_b=True) * sm_scale  # [group_pad, block_tokens]
        tok = page0 * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        valid = tok < length
        s = jnp.where(valid, s, MASK_VALUE)
        v_tok = page0 * page_size + lax.broadcasted_iota(jnp.int32, (block_tokens, head_dim), 0)
        v = jnp.where(v_tok < length, v, jnp.zeros_like(v))
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.where(valid, jnp.exp(s - m_next[:, None]), 0.0)
        l_next = alpha * l + jnp.sum(p, axis=1)
        acc_next = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc_next, m_next, l_next

    carry = (
        jnp.zeros((group_pad, head_dim), jnp.float32),
        jnp.full((group_pad,), MASK_VALUE, jnp.float32),
        jnp.zeros((group_pad,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, pl.cdiv(my_pages, ppcb), body, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _combine(acc, m, l):
    """acc [..., splits, g, d], m/l [..., splits, g] -> [..., g, d] by log-sum-exp weights."""
    w = jnp.exp(m - jnp.max(m, axis=-2, keepdims=True))  # empty splits: l = 0
    num = jnp.sum(w[..., None] * acc, axis=-3)
    den = jnp.sum(w * l, axis=-2)[..., None]
    return jnp.where(den > 0.0, num / jnp.where(den > 0.0, den, 1.0), 0.0)


@traced_in_32_bits
@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "pages_per_compute_block", "num_splits", "num_warps", "num_stages",
        "interpret",
    ),
)
def paged_attention_gpu(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # i32[batch]
    page_indices: jax.Array,  # i32[batch, pages_per_sequence]
    *,
    sm_scale: float | None = None,
    pages_per_compute_block: int = 4,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret=None,
) -> jax.Array:  # [batch, heads, head_dim], q.dtype
    """GPU flash-decoding. `num_splits=None` picks enough splits to fill the GPU."""
    batch, heads, head_dim = q.shape
    kv_heads, total_pages, page_size, _ = k_pages.shape
    group = heads // kv_heads
    scale = default_scale(head_dim, sm_scale)
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two for the GPU kernel, got {page_size}")
    ppcb = next_power_of_2(max(pages_per_compute_block, -(-16 // page_size)))
    pps = page_indices.shape[1]
    lengths = jnp.clip(lengths, 0, pps * page_size).astype(jnp.int32)
    page_indices = jnp.clip(page_indices, 0, total_pages - 1)  # as the reference's gather: never an OOB load

    num_blocks = -(-pps // ppcb)
    if num_splits is None:
        num_splits = -(-_TARGET_PROGRAMS // (batch * kv_heads))
    num_splits = max(1, min(num_splits, num_blocks))
    pages_per_split = round_up(-(-pps // num_splits), ppcb)
    pages = pad_axis(page_indices, 1, num_splits * pages_per_split)
    pages = pages.reshape(batch, num_splits, pages_per_split)

    group_pad = max(16, next_power_of_2(group))
    dim_pad = max(16, next_power_of_2(head_dim))
    q_bkgd = pad_axis(pad_axis(q.reshape(batch, kv_heads, group, head_dim), 2, group_pad), 3, dim_pad)
    k_pages = pad_axis(k_pages, 3, dim_pad)  # no-op for power-of-two head_dim
    v_pages = pad_axis(v_pages, 3, dim_pad)

    kernel = functools.partial(
        _decode_kernel, sm_scale=scale, ppcb=ppcb, pages_per_split=pages_per_split
    )
    cache_spec = pl.BlockSpec((None, total_pages, page_size, dim_pad), lambda b, h, s: (h, 0, 0, 0))
    part = (batch, kv_heads, num_splits, group_pad)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, pages_per_split), lambda b, h, s: (b, s, 0)),
            pl.BlockSpec((None, None, group_pad, dim_pad), lambda b, h, s: (b, h, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group_pad, dim_pad), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*part, dim_pad), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_arg(interpret),
    )(lengths, pages, q_bkgd, k_pages, v_pages)
    out = _combine(acc, m, l)  # [batch, kv_heads, group_pad, dim_pad]
    return out[:, :, :group, :head_dim].reshape(batch, heads, head_dim).astype(q.dtype)
