"""Causal prefill attention for GPU (Pallas, Triton lowering).

Grid: (heads, batch, q_blocks), the q blocks in reverse: under a causal mask the last q
block has the most work, so the longest programs start first and the short ones fill the
tail of the last wave. One program owns a [block_q, head_dim] query tile and walks K/V of
its KV head (h // group, so GQA needs no repeated K/V) in `block_k` steps with an online
softmax in f32, in base 2 (scores are pre-multiplied by log2(e): exp2 lowers to the fast
hardware instruction, where exp lowers to libdevice's accurate and slower expf):

    hi = min(length, end of the q tile)        # causal + ragged upper bound (0 past the length)
    for blocks wholly below the diagonal and the length: no masks   (fast loop)
    for the remaining blocks up to hi:           masks on scores AND V rows

Row b's query i sits at key position q_offsets[b] + i (0 for a whole prompt; the cached
prefix's length for the tokens after it). Triton wants power-of-two tile dims, so head_dim is padded to one (>= 16 for
tl.dot), and seq to a multiple of both blocks, inside the wrapper.
"""

from __future__ import annotations

import functools
import math

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


_LOG2E = math.log2(math.e)


def _q_block(program: int, num_programs: int):
    """The q block a program owns: the last (largest causal) block first."""
    return num_programs - 1 - program


def _dot(a, b, *, trans_b=False):
    """f32-accumulating tile matmul; f32 inputs use IEEE products, not TF32."""
    return pltr.dot(a, b, trans_b=trans_b, precision=dot_precision(a.dtype)).astype(jnp.float32)


def _flash_kernel(
    lengths_ref,  # i32[1]
    offsets_ref,  # i32[1], the row's first query position
    q_ref,  # [block_q, head_dim]
    k_ref,  # [seq_pad, head_dim]
    v_ref,  # [seq_pad, head_dim]
    o_ref,  # [block_q, head_dim]
    *,
    causal: bool,
    sm_scale: float,
    block_q: int,
    block_k: int,
):
    qi = _q_block(pl.program_id(2), pl.num_programs(2))
    length = lengths_ref[0]
    q_start = offsets_ref[0] + qi * block_q
    q = q_ref[...]
    head_dim = q.shape[-1]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, carry, *, masked: bool):
        acc, m, l = carry
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, trans_b=True) * (sm_scale * _LOG2E)  # base-2 scores
        if masked:
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            valid = k_pos < length
            if causal:
                valid = jnp.logical_and(valid, k_pos <= q_pos)
            s = jnp.where(valid, s, MASK_VALUE)
            v_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)
            v = jnp.where(v_pos < length, v, jnp.zeros_like(v))
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:
            p = jnp.where(valid, p, 0.0)
        l_next = alpha * l + jnp.sum(p, axis=1)
        pv = _dot(p.astype(v.dtype), v)
        return acc * alpha[:, None] + pv, m_next, l_next

    hi = jnp.minimum(length, q_start + block_q) if causal else length
    # A tile wholly past the length (bucket padding) is padding: it reads nothing.
    num_blocks = jnp.where(q_start < length, pl.cdiv(hi, block_k), 0)
    # Blocks that end at or before both the length and the first query row need no mask.
    safe_end = jnp.minimum(length, q_start + 1) if causal else length
    num_unmasked = jnp.minimum(safe_end // block_k, num_blocks)

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(0, num_unmasked, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(
        num_unmasked, num_blocks, functools.partial(body, masked=True), carry
    )
    inv = jnp.where(l > 0.0, 1.0 / jnp.where(l > 0.0, l, 1.0), 0.0)
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)


@traced_in_32_bits
@functools.partial(
    jax.jit,
    static_argnames=(
        "causal", "sm_scale", "block_q", "block_k", "num_warps", "num_stages", "interpret"
    ),
)
def flash_attention_gpu(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    lengths: jax.Array | None = None,  # i32[batch]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offsets: jax.Array | None = None,  # i32[batch]; None: zeros (q_seq == seq)
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,  # 3 beat 2 with 64x64 blocks in both H200 runs (7% and 2%, RESULTS.md)
    interpret=None,
) -> jax.Array:  # [batch, q_seq, heads, head_dim], q.dtype
    """GPU flash attention; block sizes must be powers of two >= 16."""
    batch, q_seq, heads, head_dim = q.shape
    seq, group = k.shape[1], heads // k.shape[2]
    scale = default_scale(head_dim, sm_scale)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if lengths is None:
        lengths = jnp.full((batch,), seq, jnp.int32)
    lengths = jnp.clip(lengths, 0, seq).astype(jnp.int32)
    if q_offsets is None:
        q_offsets = jnp.zeros((batch,), jnp.int32)
    q_offsets = jnp.clip(q_offsets, 0, seq).astype(jnp.int32)  # past seq every query is padding; no int32 overflow

    block_q = min(block_q, max(16, next_power_of_2(q_seq)))
    block_k = min(block_k, max(16, next_power_of_2(seq)))
    q_pad, seq_pad = round_up(q_seq, block_q), round_up(seq, block_k)
    num_q_blocks = q_pad // block_q
    dim_pad = max(16, next_power_of_2(head_dim))

    def prep(x, length):  # [batch, length, n, dim_pad], zero padded
        return pad_axis(pad_axis(x, 1, length), 3, dim_pad)

    kernel = functools.partial(
        _flash_kernel, causal=causal, sm_scale=scale, block_q=block_q, block_k=block_k
    )
    out = pl.pallas_call(
        kernel,
        grid=(heads, batch, num_q_blocks),
        in_specs=[
            pl.BlockSpec((1,), lambda h, b, i: (b,)),
            pl.BlockSpec((1,), lambda h, b, i: (b,)),
            pl.BlockSpec((None, block_q, None, dim_pad), lambda h, b, i: (b, _q_block(i, num_q_blocks), h, 0)),
            pl.BlockSpec((None, seq_pad, None, dim_pad), lambda h, b, i: (b, 0, h // group, 0)),
            pl.BlockSpec((None, seq_pad, None, dim_pad), lambda h, b, i: (b, 0, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, dim_pad), lambda h, b, i: (b, _q_block(i, num_q_blocks), h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, q_pad, heads, dim_pad), q.dtype),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_arg(interpret),
    )(lengths, q_offsets, prep(q, q_pad), prep(k, seq_pad), prep(v, seq_pad))
    return out[:, :q_seq, :, :head_dim]
