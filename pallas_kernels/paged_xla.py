"""Paged decode attention in plain JAX, written for XLA's CPU backend.

The reference (reference.py) gathers every page of the table at once and then attends: simple,
but on a CPU it writes a [batch, kv_heads, pages x page_size, head_dim] temporary for K and V,
fresh memory every step, and reads the whole table even where every row is short.

This version does work in proportion to the tokens in the cache, not to batch x longest row.
It cuts each row's pages into chunks of `pages_per_chunk` and lists the chunks that hold a
row's tokens, row after row: a flat, ragged list of work, as in vLLM's and tpu-inference's
ragged paged attention. It walks that list `chunks_per_block` chunks at a time (by default
about 2 MiB of K per block, so a block's K/V stays in cache), with an online softmax per row
(flash-decoding's running max and sum), and stops after the last chunk in use. So a page table
padded to a bucket costs nothing, and one 2000-token row in a batch of 200-token rows costs its
own chunks only (a walk by blocks of the whole batch, the version before this one, read every
row to the longest: 3x slower on such batches, see scripts/bench/RESULTS.md).

A block may hold the chunks of several rows: scores and values are computed per chunk, then
reduced into their rows with sorted segment reductions (scatter max and add).

Masking matches the reference: scores past a row's length are dropped and the V rows there are
zeroed before use, so NaN in stale slots or foreign pages cannot reach the output. Running max and
scores use a finite floor instead of -inf, so a chunk with no valid slot updates nothing and never
computes inf - inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30
# Full f32 products: on a GPU XLA's default f32 dot is TF32 (rel err 4e-4 seen on an H200).
_HIGHEST = jax.lax.Precision.HIGHEST
# Default block: as many chunks as make about this much float32 K. Measured on a 2-core x86 CPU
# (scripts/bench/RESULTS.md, "CPU paged attention"): 1-4 MiB blocks were best at every batch and
# context tried; much larger ones fall out of cache, much smaller ones pay per loop step.
TARGET_BLOCK_BYTES = 2 << 20
# Pages per chunk: 2 was as fast as the best of 1-8 on uniform batches and wastes at most one page
# per row (same measurements).
PAGES_PER_CHUNK = 2


def default_chunks_per_block(kv_heads: int, page_size: int, head_dim: int, pages_per_chunk: int) -> int:
    chunk_bytes = kv_heads * pages_per_chunk * page_size * head_dim * 4  # one chunk's K, float32
    return max(1, TARGET_BLOCK_BYTES // chunk_bytes)


def paged_attention_xla(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # i32[batch], tokens in the cache including the new one
    page_indices: jax.Array,  # i32[batch, pages_per_sequence]
    *,
    sm_scale: float | None = None,
    pages_per_chunk: int = PAGES_PER_CHUNK,
    chunks_per_block: int | None = None,  # None: default_chunks_per_block
) -> jax.Array:  # [batch, heads, head_dim], q.dtype
    batch, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    for name, value in (("pages_per_chunk", pages_per_chunk), ("chunks_per_block", chunks_per_block)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    group = heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    width = page_indices.shape[1]
    if batch == 0:
        return jnp.zeros((0, heads, head_dim), q.dtype)
    # A length past the table would count the padding below (page 0, not the row's) as tokens.
    lengths = jnp.clip(lengths, 0, width * page_size)
    page_indices = jnp.clip(page_indices, 0, k_pages.shape[1] - 1)  # as the reference
    pages_per_chunk = min(pages_per_chunk, width)
    chunk_tokens = pages_per_chunk * page_size
    chunks_per_row = -(-width // pages_per_chunk)
    if chunks_per_block is None:
        chunks_per_block = default_chunks_per_block(kv_heads, page_size, head_dim, pages_per_chunk)
    chunks_per_block = min(chunks_per_block, batch * chunks_per_row)
    num_blocks = -(-batch * chunks_per_row // chunks_per_block)

    # The work list: chunk f is chunk `chunk[f]` of row `row[f]`, rows in order, only the chunks
    # that hold tokens; entries past `in_use` (the static list is as long as every chunk of
    # every row) have no valid slot and point at row batch-1's first chunk.
    row_chunks = jnp.clip((lengths + chunk_tokens - 1) // chunk_tokens, 0, chunks_per_row)
    ends = jnp.cumsum(row_chunks)
    in_use = ends[-1]
    f = jnp.arange(num_blocks * chunks_per_block)
    row = jnp.minimum(jnp.searchsorted(ends, f, side="right"), batch - 1)
    chunk = jnp.clip(f - (ends - row_chunks)[row], 0, chunks_per_row - 1)
    valid_slots = jnp.where(f < in_use, jnp.clip(lengths[row] - chunk * chunk_tokens, 0, chunk_tokens), 0)
    # Padding the table to whole chunks points at page 0, masked like any slot past a length.
    table = jnp.pad(page_indices, ((0, 0), (0, chunks_per_row * pages_per_chunk - width)))
    chunk_pages = table.reshape(batch, chunks_per_row, pages_per_chunk)[row, chunk]  # [work, pages_per_chunk]

    q_rows = q.reshape(batch, kv_heads, group, head_dim).astype(jnp.float32) * scale

    def attend_block(i, carry):
        running_max, running_sum, acc = carry  # [batch, kv_heads, group] x2, [batch, kv_heads, group, head_dim]
        rows, pages, slots = (jax.lax.dynamic_slice_in_dim(a, i * chunks_per_block, chunks_per_block)
                              for a in (row, chunk_pages, valid_slots))
        valid = jnp.arange(chunk_tokens)[None, :] < slots[:, None]  # [chunks, chunk_tokens]
        shape = (kv_heads, chunks_per_block, chunk_tokens, head_dim)
        k = k_pages[:, pages].reshape(shape).astype(jnp.float32)
        v = v_pages[:, pages].reshape(shape).astype(jnp.float32)
        scores = jnp.einsum("ckgd,kctd->ckgt", q_rows[rows], k, precision=_HIGHEST)
        scores = jnp.where(valid[:, None, None, :], scores, _NEG)
        new_max = running_max.at[rows].max(scores.max(axis=-1), indices_are_sorted=True)
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.where(valid[:, None, None, :], jnp.exp(scores - new_max[rows][..., None]), 0.0)
        v = jnp.where(valid[None, :, :, None], v, 0.0)
        values = jnp.einsum("ckgt,kctd->ckgd", probs, v, precision=_HIGHEST)
        acc = (acc * rescale[..., None]).at[rows].add(values, indices_are_sorted=True)
        running_sum = (running_sum * rescale).at[rows].add(probs.sum(axis=-1), indices_are_sorted=True)
        return new_max, running_sum, acc

    init = (
        jnp.full((batch, kv_heads, group), _NEG, jnp.float32),
        jnp.zeros((batch, kv_heads, group), jnp.float32),
        jnp.zeros((batch, kv_heads, group, head_dim), jnp.float32),
    )
    if num_blocks == 1:
        # One block holds the whole list: no loop. Inside the model's decode step a one-block
        # loop cost 50 ms where this costs 1.6 (demo, batch 1, context 512; cause not found,
        # the time is that of copying the whole cache).
        _, total, acc = attend_block(0, init)
    else:
        _, total, acc = jax.lax.fori_loop(0, (in_use + chunks_per_block - 1) // chunks_per_block, attend_block, init)
    out = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]  # length 0: zeros, as the reference
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
