"""Decode attention over a paged KV cache for TPU (Pallas Mosaic).

Grid: (batch, kv_heads), both parallel. One program owns one sequence and one KV
head, and all `group` query heads that share it, as one [group, head_dim] tile.

    lengths, page_indices        -> SMEM by scalar prefetch
    k_pages, v_pages             -> left in HBM (memory_space=ANY)
    start DMAs for blocks 0 .. num_buffers-2
    for i in range(cdiv(length, block_tokens)):
        start DMAs for block i + num_buffers - 1    # overlaps with compute below
        wait for block i (slot i % num_buffers)
        s = q @ k_blk.T, masked past the length; V rows past it zeroed too
        online-softmax update of m, l, acc
    o = acc / l

A block is `pages_per_compute_block` pages. Only pages below the length are copied:
the rest of a buffer keeps whatever it held, which the masks make irrelevant.
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

_LANES = 128


def _block_copies(pages_hbm, buf, sem, page_indices_ref, *, b, h, block, slot, ppcb, pps):
    """Descriptor factories for the `ppcb` page copies of one block into buf[slot]."""

    def make(j):
        page = page_indices_ref[b * pps + block * ppcb + j]
        return pltpu.make_async_copy(pages_hbm.at[h, page], buf.at[slot, j], sem.at[slot])

    return [functools.partial(make, j) for j in range(ppcb)]


def _paged_kernel(
    lengths_ref,  # SMEM i32[batch]
    page_indices_ref,  # SMEM i32[batch * pages_per_sequence]
    q_ref,  # [group_pad, head_dim]
    k_hbm,  # HBM [kv_heads, total_pages, page_size, head_dim]
    v_hbm,  # HBM [kv_heads, total_pages, page_size, head_dim]
    o_ref,  # [group_pad, head_dim]
    k_buf,  # VMEM [num_buffers, ppcb, page_size, head_dim]
    v_buf,  # VMEM [num_buffers, ppcb, page_size, head_dim]
    k_sem,  # DMA semaphores [num_buffers]
    v_sem,  # DMA semaphores [num_buffers]
    m_ref,  # f32[group_pad, 128]
    l_ref,  # f32[group_pad, 128]
    acc_ref,  # f32[group_pad, head_dim]
    *,
    sm_scale: float,
    ppcb: int,
    pps: int,
    num_buffers: int,
):
    b, h = pl.program_id(0), pl.program_id(1)
    page_size, head_dim = k_buf.shape[2], k_buf.shape[3]
    block_tokens = ppcb * page_size
    length = lengths_ref[b]
    num_pages = pl.cdiv(length, page_size)
    num_blocks = pl.cdiv(length, block_tokens)

    def for_pages(block, slot, action):
        """Runs `action(copy)` on each page copy of `block` that lies below the length."""
        for pages_hbm, buf, sem in ((k_hbm, k_buf, k_sem), (v_hbm, v_buf, v_sem)):
            makers = _block_copies(
                pages_hbm, buf, sem, page_indices_ref,
                b=b, h=h, block=block, slot=slot, ppcb=ppcb, pps=pps,
            )
            for j, make in enumerate(makers):
                pl.when(block * ppcb + j < num_pages)(lambda make=make: action(make()))

    def start(block):
        @pl.when(block < num_blocks)
        def _():
            for_pages(block, block % num_buffers, lambda c: c.start())

    m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)
    for block in range(num_buffers - 1):
        start(block)

    q = q_ref[...]

    def body(i, carry):
        start(i + num_buffers - 1)
        slot = i % num_buffers
        for_pages(i, slot, lambda c: c.wait())
        k = k_buf[slot].reshape(block_tokens, head_dim)
        v = v_buf[slot].reshape(block_tokens, head_dim)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())),
            precision=dot_precision(q.dtype), preferred_element_type=jnp.float32,
        ) * sm_scale  # [group_pad, block_tokens]
        tok = i * block_tokens + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        valid = tok < length
        s = jnp.where(valid, s, MASK_VALUE)
        v_tok = i * block_tokens + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
        v = jnp.where(v_tok < length, v, jnp.zeros_like(v))

        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(valid, jnp.exp(s - m_next[:, :1]), 0.0)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        pv = jnp.dot(
            p.astype(v.dtype), v,
            precision=dot_precision(v.dtype), preferred_element_type=jnp.float32,
        )
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv
        return carry

    lax.fori_loop(0, num_blocks, body, 0)
    l = l_ref[...][:, :1]
    inv = jnp.where(l > 0.0, 1.0 / jnp.where(l > 0.0, l, 1.0), 0.0)
    o_ref[...] = (acc_ref[...] * inv).astype(o_ref.dtype)


@traced_in_32_bits
@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "pages_per_compute_block", "num_buffers", "interpret"),
)
def paged_attention_tpu(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # i32[batch]
    page_indices: jax.Array,  # i32[batch, pages_per_sequence]
    *,
    sm_scale: float | None = None,
    pages_per_compute_block: int = 8,
    num_buffers: int = 2,
    interpret=None,
) -> jax.Array:  # [batch, heads, head_dim], q.dtype
    """TPU paged decode attention; `num_buffers` >= 2 blocks of pages are in flight."""
    batch, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = heads // kv_heads
    scale = default_scale(head_dim, sm_scale)
    if num_buffers < 2:
        raise ValueError(f"num_buffers must be at least 2, got {num_buffers}")
    if pages_per_compute_block < 1:
        raise ValueError(f"pages_per_compute_block must be >= 1, got {pages_per_compute_block}")

    lengths = jnp.clip(lengths, 0, page_indices.shape[1] * page_size)
    page_indices = jnp.clip(page_indices, 0, k_pages.shape[1] - 1)  # as the reference's gather: never an OOB DMA
    ppcb = min(pages_per_compute_block, page_indices.shape[1])
    pps = round_up(page_indices.shape[1], ppcb)
    page_indices = pad_axis(page_indices, 1, pps)  # padded pages are never copied

    # All query heads of a KV head form one tile; pad it to whole sublanes.
    group_pad = round_up(group, 8)
    q_bkgd = pad_axis(q.reshape(batch, kv_heads, group, head_dim), 2, group_pad)
    tile = pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h, *_: (b, h, 0, 0))

    kernel = functools.partial(
        _paged_kernel, sm_scale=scale, ppcb=ppcb, pps=pps, num_buffers=num_buffers
    )
    buf_shape = (num_buffers, ppcb, page_size, head_dim)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads),
            in_specs=[
                tile,
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=tile,
            scratch_shapes=[
                pltpu.VMEM(buf_shape, k_pages.dtype),
                pltpu.VMEM(buf_shape, v_pages.dtype),
                pltpu.SemaphoreType.DMA((num_buffers,)),
                pltpu.SemaphoreType.DMA((num_buffers,)),
                pltpu.VMEM((group_pad, _LANES), jnp.float32),
                pltpu.VMEM((group_pad, _LANES), jnp.float32),
                pltpu.VMEM((group_pad, head_dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q_bkgd.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_arg(interpret),
    )(lengths.astype(jnp.int32), page_indices.reshape(-1), q_bkgd, k_pages, v_pages)
    return out[:, :, :group].reshape(batch, heads, head_dim)
