"""Causal prefill attention for TPU (Pallas Mosaic): online softmax over K/V blocks.

Grid: (batch, heads, q_blocks, k_blocks), the k axis innermost and sequential. Row b's
query i sits at key position q_offsets[b] + i (0 for a whole prompt; the cached prefix's
length for the tokens after it).

    for each (b, h, qi):                 # parallel
        m, l, acc = MASK, 0, 0           # f32 scratch, live across the k axis
        for kj in k blocks:              # "arbitrary": revisits the same output tile
            skip if the block is past lengths[b] or wholly above the causal diagonal
            s = q_blk @ k_blk.T * scale  (masked only on boundary blocks)
            online-softmax update of m, l, acc
        o_blk = acc / l

GQA: query head h reads K/V head h // group through the BlockSpec index_map, so
repeated K/V are never materialised. Skipped blocks are also not fetched: the K/V
index_map clamps kj to the last block the (b, qi) tile needs, and the pipeline does
not re-copy a block whose index did not change. `lengths` and `q_offsets` arrive by
scalar prefetch (SMEM) so both the index_maps and the kernel can read them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from splitserve.pallas_kernels._util import (
    traced_in_32_bits,
    MASK_VALUE,
    default_scale,
    dot_precision,
    interpret_arg,
    pad_axis,
    round_up,
)

_LANES = 128  # m and l live lane-wide, [block_q, 128], the layout Mosaic likes.


def _last_k_block(length, q_first, *, block_q, block_k, causal):
    """Index of the last K block that the query block whose first position is `q_first` needs (0 for
    a block wholly past the length: it computes nothing, so it must not fetch the row's K/V either)."""
    # lax.div truncates; the operands are non-negative, so it is floor division
    # without the sign fix-up that `//` lowers to.
    last = lax.div(jnp.maximum(length - 1, 0), block_k)
    if causal:
        last = jnp.minimum(last, lax.div(q_first + block_q - 1, block_k))
    return jnp.where(q_first < length, last, 0)


def _flash_kernel(
    lengths_ref,  # SMEM i32[batch]
    offsets_ref,  # SMEM i32[batch], each row's first query position
    q_ref,  # [block_q, head_dim]
    k_ref,  # [block_k, head_dim]
    v_ref,  # [block_k, head_dim]
    o_ref,  # [block_q, head_dim]
    m_ref,  # f32[block_q, 128] running max
    l_ref,  # f32[block_q, 128] running denominator
    acc_ref,  # f32[block_q, head_dim] running numerator
    *,
    causal: bool,
    sm_scale: float,
    block_q: int,
    block_k: int,
):
    b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = lengths_ref[b]
    q_start, k_start = offsets_ref[b] + qi * block_q, kj * block_k

    @pl.when(kj == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def update(masked: bool):
        q = q_ref[...]
        k = k_ref[...]
        v = v_ref[...]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())),
            precision=dot_precision(q.dtype), preferred_element_type=jnp.float32,
        ) * sm_scale  # [block_q, block_k]
        if masked:
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            valid = k_pos < length
            if causal:
                q_pos = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                valid = jnp.logical_and(valid, k_pos <= q_pos)
            s = jnp.where(valid, s, MASK_VALUE)
            # Rows past the length may hold NaN: 0 * NaN would leak through p @ v.
            v_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v = jnp.where(v_pos < length, v, jnp.zeros_like(v))

        m_prev = m_ref[...]  # [block_q, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, :1])
        if masked:
            p = jnp.where(valid, p, 0.0)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        pv = jnp.dot(
            p.astype(v.dtype), v,
            precision=dot_precision(v.dtype), preferred_element_type=jnp.float32,
        )
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv

    run = jnp.logical_and(k_start < length, q_start < length)
    needs_mask = k_start + block_k > length
    if causal:
        run = jnp.logical_and(run, k_start <= q_start + block_q - 1)
        needs_mask = jnp.logical_or(needs_mask, k_start + block_k - 1 > q_start)

    @pl.when(jnp.logical_and(run, needs_mask))
    def _masked():
        update(masked=True)

    @pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))
    def _unmasked():
        update(masked=False)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _finalize():
        l = l_ref[...][:, :1]
        # Rows with nothing to attend to (past the length) get 0, not 0/0.
        inv = jnp.where(l > 0.0, 1.0 / jnp.where(l > 0.0, l, 1.0), 0.0)
        o_ref[...] = (acc_ref[...] * inv).astype(o_ref.dtype)


@traced_in_32_bits
@functools.partial(
    jax.jit, static_argnames=("causal", "sm_scale", "block_q", "block_k", "interpret")
)
def flash_attention_tpu(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    lengths: jax.Array | None = None,  # i32[batch]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offsets: jax.Array | None = None,  # i32[batch]; None: zeros (q_seq == seq)
    block_q: int = 128,
    block_k: int = 128,
    interpret=None,
) -> jax.Array:  # [batch, q_seq, heads, head_dim], q.dtype
    """TPU flash attention. `block_q`/`block_k` must be multiples of 8 (Mosaic tiling).

    `interpret`: None/False compiles for TPU; True or pltpu.InterpretParams() runs
    the kernel in Pallas's interpreter (CPU).
    """
    batch, q_seq, heads, head_dim = q.shape
    seq, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = default_scale(head_dim, sm_scale)
    if block_q % 8 or block_k % 8:
        raise ValueError(f"block_q ({block_q}) and block_k ({block_k}) must be multiples of 8")
    if lengths is None:
        lengths = jnp.full((batch,), seq, jnp.int32)
    lengths = jnp.clip(lengths, 0, seq)
    if q_offsets is None:
        q_offsets = jnp.zeros((batch,), jnp.int32)
    q_offsets = jnp.clip(q_offsets, 0, seq)  # past seq every query is padding; no int32 overflow in the index maths

    # Short sequences get one block; otherwise pad each to a multiple of its block.
    block_q = min(block_q, round_up(q_seq, 8))
    block_k = min(block_k, round_up(seq, 8))
    dim_pad = round_up(head_dim, _LANES)

    def prep(x, block):  # [batch, s, n, head_dim] -> [batch, n, s_pad, dim_pad]
        x = pad_axis(pad_axis(x, 1, round_up(x.shape[1], block)), 3, dim_pad)
        return jnp.swapaxes(x, 1, 2)

    q_bhsd, k_bhsd, v_bhsd = prep(q, block_q), prep(k, block_k), prep(v, block_k)
    num_q_blocks, num_k_blocks = q_bhsd.shape[2] // block_q, k_bhsd.shape[2] // block_k

    def q_map(b, h, qi, kj, lengths_ref, offsets_ref):
        return b, h, qi, 0

    def kv_map(b, h, qi, kj, lengths_ref, offsets_ref):
        last = _last_k_block(
            lengths_ref[b], offsets_ref[b] + qi * block_q, block_q=block_q, block_k=block_k, causal=causal
        )
        return b, lax.div(h, group), jnp.minimum(kj, last), 0

    kernel = functools.partial(
        _flash_kernel, causal=causal, sm_scale=scale, block_q=block_q, block_k=block_k
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, num_q_blocks, num_k_blocks),
            in_specs=[
                pl.BlockSpec((None, None, block_q, dim_pad), q_map),
                pl.BlockSpec((None, None, block_k, dim_pad), kv_map),
                pl.BlockSpec((None, None, block_k, dim_pad), kv_map),
            ],
            out_specs=pl.BlockSpec((None, None, block_q, dim_pad), q_map),
            scratch_shapes=[
                pltpu.VMEM((block_q, _LANES), jnp.float32),
                pltpu.VMEM((block_q, _LANES), jnp.float32),
                pltpu.VMEM((block_q, dim_pad), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q_bhsd.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret_arg(interpret),
    )(lengths.astype(jnp.int32), q_offsets.astype(jnp.int32), q_bhsd, k_bhsd, v_bhsd)
    return jnp.swapaxes(out, 1, 2)[:, :q_seq, :, :head_dim]
