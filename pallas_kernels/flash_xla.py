"""Prefill attention in plain JAX for XLA's CPU backend: the reference's arithmetic, a block of
queries at a time.

The reference builds every score at once, [batch, heads, q_seq, seq] in f32: 128 MiB per 8
heads at 2048 positions, which a CPU streams through memory several times (mask, softmax, the
product with V). A block of queries keeps its scores small enough to stay in cache, and under a
causal mask without query offsets, block i needs only the keys up to its own last position, a
static slice, so about half the products are skipped. Measured on a 2-core CPU (demo model, one
1900-token prompt): see scripts/bench/RESULTS.md, "CPU prefill attention".

Blocks are unrolled at trace time (their key ranges differ in shape), at most MAX_BLOCKS of them,
so the program stays small at long contexts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from splitserve.pallas_kernels.reference import flash_attention_reference

QUERY_BLOCK = 128
MAX_BLOCKS = 16


def flash_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *,
                        causal: bool = True, sm_scale: float | None = None, q_offsets: jax.Array | None = None,
                        query_block: int = QUERY_BLOCK) -> jax.Array:
    """As flash_attention_reference (same arguments and result), block by block of queries."""
    q_seq, seq = q.shape[1], k.shape[1]
    block = max(query_block, -(-q_seq // MAX_BLOCKS))
    if q_seq <= block:
        return flash_attention_reference(q, k, v, lengths=lengths, causal=causal, sm_scale=sm_scale,
                                         q_offsets=q_offsets)
    starts = jnp.zeros((q.shape[0],), jnp.int32) if q_offsets is None else jnp.clip(q_offsets, 0, seq)
    outs = []
    for first in range(0, q_seq, block):
        last = min(first + block, q_seq)
        # Without offsets, query i sits at key position i: a causal block sees keys below `last` only.
        keys = min(last, seq) if causal and q_offsets is None else seq
        outs.append(flash_attention_reference(q[:, first:last], k[:, :keys], v[:, :keys], lengths=lengths,
                                              causal=causal, sm_scale=sm_scale, q_offsets=starts + first))
    return jnp.concatenate(outs, axis=1)
