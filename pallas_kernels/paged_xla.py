"""Paged decode attention in plain JAX, written for XLA's CPU backend.

The reference (reference.py) gathers every page of the table at once and then attends: simple,
but on a CPU it writes a [batch, kv_heads, pages x page_size, head_dim] temporary for K and V,
fresh memory every step, and reads the whole table even where every row is short. This version
walks the table in blocks of `pages_per_block` pages (by default sized to the batch, below) with an online softmax (flash-decoding's
running max and sum), so each block's K/V stays in cache, and it stops after the block that holds
the longest row's last token: a page table padded to a bucket costs nothing.

Masking matches the reference: scores past a row's length are dropped and the V rows there are
zeroed before use, so NaN in stale slots or foreign pages cannot reach the output. Running max and
scores use a finite floor instead of -inf, so a block with no valid slot for some row (that row is
shorter) updates nothing and never computes inf - inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30
# Full f32 products: on a GPU XLA's default f32 dot is TF32 (rel err 4e-4 seen on an H200).
_HIGHEST = jax.lax.Precision.HIGHEST
# Default block size: as many pages as make each block's K (and V) gather about this big, in
# float32, for the whole batch. Measured on a 2-core x86 CPU (scripts/bench/RESULTS.md, "CPU paged
# attention"): this rule came within ~20% of the best of 2..32 pages at every batch 1-64
# and context 144-2048 tried; 2 pages at batch 1 ran 3x slower (64 short loop steps), and 8 MiB
# blocks at batch 64 2x slower (out of cache).
TARGET_BLOCK_BYTES = 2 << 20


def default_pages_per_block(batch: int, kv_heads: int, page_size: int, head_dim: int, table_width: int) -> int:
    page_bytes = batch * kv_heads * page_size * head_dim * 4  # one page of every row, float32
    return max(1, min(table_width, TARGET_BLOCK_BYTES // page_bytes))


def paged_attention_xla(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # i32[batch], tokens in the cache including the new one
    page_indices: jax.Array,  # i32[batch, pages_per_sequence]
    *,
    sm_scale: float | None = None,
    pages_per_block: int | None = None,  # None: default_pages_per_block (static shapes only)
) -> jax.Array:  # [batch, heads, head_dim], q.dtype
    batch, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(batch, kv_heads, page_size, head_dim, page_indices.shape[1])
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")
    group = heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    pages_per_block = min(pages_per_block, page_indices.shape[1])
    block_tokens = pages_per_block * page_size

    # Pad the table to whole blocks; the padding points at page 0 and is masked like any slot
    # past a length.
    num_blocks = -(-page_indices.shape[1] // pages_per_block)
    table = jnp.pad(page_indices, ((0, 0), (0, num_blocks * pages_per_block - page_indices.shape[1])))
    blocks_needed = jnp.minimum((jnp.max(lengths) + block_tokens - 1) // block_tokens, num_blocks)

    q_kbgd = (q.reshape(batch, kv_heads, group, head_dim).astype(jnp.float32) * scale).transpose(1, 0, 2, 3)

    def attend_block(i, carry):
        running_max, running_sum, acc = carry  # [kv_heads, batch, group] x2, [kv_heads, batch, group, head_dim]
        pages = jax.lax.dynamic_slice_in_dim(table, i * pages_per_block, pages_per_block, axis=1)
        k = k_pages[:, pages].reshape(kv_heads, batch, block_tokens, head_dim).astype(jnp.float32)
        v = v_pages[:, pages].reshape(kv_heads, batch, block_tokens, head_dim).astype(jnp.float32)
        valid = (i * block_tokens + jnp.arange(block_tokens))[None, :] < lengths[:, None]  # [batch, block]
        scores = jnp.einsum("kbgd,kbtd->kbgt", q_kbgd, k, precision=_HIGHEST)
        scores = jnp.where(valid[None, :, None, :], scores, _NEG)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.where(valid[None, :, None, :], jnp.exp(scores - new_max[..., None]), 0.0)
        v = jnp.where(valid[None, :, :, None], v, 0.0)
        acc = acc * rescale[..., None] + jnp.einsum("kbgt,kbtd->kbgd", probs, v, precision=_HIGHEST)
        return new_max, running_sum * rescale + probs.sum(axis=-1), acc

    init = (
        jnp.full((kv_heads, batch, group), _NEG, jnp.float32),
        jnp.zeros((kv_heads, batch, group), jnp.float32),
        jnp.zeros((kv_heads, batch, group, head_dim), jnp.float32),
    )
    if num_blocks == 1:
        # One block holds the whole table: no loop. Inside the model's decode step a one-block
        # loop cost 50 ms where this costs 1.6 (demo, batch 1, context 512; cause not found,
        # the time is that of copying the whole cache).
        _, total, acc = attend_block(0, init)
    else:
        _, total, acc = jax.lax.fori_loop(0, blocks_needed, attend_block, init)
    out = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]  # length 0: zeros, as the reference
    return out.transpose(1, 0, 2, 3).reshape(batch, heads, head_dim).astype(q.dtype)
