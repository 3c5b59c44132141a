"""The model's attention: the kernels of pallas_kernels, run per tensor-parallel shard.

A Pallas kernel is not partitioned by XLA, so under a `tp` mesh each device runs it on its
own heads with `shard_map`. HeadLayout guarantees that the query heads of a shard attend
only to that shard's KV heads (both are laid out contiguously by group), so no
communication is needed inside attention.

The model picks kernels that are proven on the platform: TPU kernels on TPU; the GPU
kernels on a GPU (on an H200, decode of a 1.1B Llama at batch 64 took 5.0 ms a step with them
and 9.2 ms with the reference at context 2048; prefill attention alone was 21x faster, see
scripts/bench/RESULTS.md); on a CPU the plain-JAX "xla" paged attention (it stops at the
longest row instead of reading the whole padded page table; tested against the reference
like the kernels); the plain-JAX reference elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from splitserve import pallas_kernels

MODEL_DEFAULT_IMPL = {"tpu": "tpu", "gpu": "gpu", "cpu": "xla"}


def model_attention_impl(impl: str, page_size: int | None = None) -> str:
    """`page_size`: of a decode call (a GPU page size the Triton kernel cannot tile gets "xla")."""
    if impl != "auto":
        return impl
    return pallas_kernels.gpu_fallback(MODEL_DEFAULT_IMPL.get(jax.default_backend(), "reference"), page_size)


def _per_shard(fn, mesh: Mesh | None, in_specs, out_specs):
    if mesh is None or mesh.size == 1:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def prefill_attention(q, k, v, lengths, *, impl: str, mesh: Mesh | None):
    """q [b, s, heads, hd], k/v [b, s, kv_heads, hd], lengths i32[b] -> [b, s, heads, hd]."""
    heads = P(None, None, "tp", None)
    fn = functools.partial(_flash, impl=model_attention_impl(impl))
    return _per_shard(fn, mesh, (heads, heads, heads, P(None)), heads)(q, k, v, lengths)


def decode_attention(q, k_pages, v_pages, lengths, page_table, *, impl: str, mesh: Mesh | None):
    """q [b, heads, hd], pages [kv_heads, pages, page_size, hd] -> [b, heads, hd]."""
    fn = functools.partial(_paged, impl=model_attention_impl(impl, page_size=k_pages.shape[2]))
    specs = (P(None, "tp", None), P("tp", None, None, None), P("tp", None, None, None), P(None), P(None, None))
    return _per_shard(fn, mesh, specs, P(None, "tp", None))(q, k_pages, v_pages, lengths, page_table)


def _flash(q, k, v, lengths, *, impl):
    return pallas_kernels.flash_attention(q, k, v, lengths=lengths, causal=True, impl=impl)


def _paged(q, k_pages, v_pages, lengths, page_table, *, impl):
    return pallas_kernels.paged_attention(q, k_pages, v_pages, lengths, page_table, impl=impl)


# Queries per step of the plain-JAX attention_after_prefix: its f32 scores are [batch, heads, chunk,
# prompt] (about 3x that with temporaries), whatever the new tokens' count. 32 heads x 128 x 16k tokens
# is 0.25 GiB a batch row; the prefill engine's token budget bounds batch x prompt. 128 rather than
# 256: on a 2-core CPU a 1900-token prompt in chunks of 256 took 564 ms against 1057 ms (smaller
# scores stay in cache; pallas_kernels/flash_xla.py blocks whole prompts the same way).
QUERY_CHUNK = 128


def attention_after_prefix(q, k, v, prefix_lengths, lengths, *, impl: str = "reference", mesh: Mesh | None = None):
    """Prompt tokens that follow a cached prefix attend over the prefix and themselves.

    q [b, s, heads, hd]: row r's query i sits at position prefix_lengths[r] + i; k/v [b, w,
    kv_heads, hd]: each row's whole prompt from position 0, valid below lengths[r] (prefix +
    new tokens). The kernels take the prefix's length as their query offset (per tensor-parallel
    shard, as prefill_attention); elsewhere it is the reference's arithmetic, QUERY_CHUNK queries
    at a time. Either way a prefix hit gives the logits a full prefill gives, to rounding.
    """
    impl = model_attention_impl(impl)
    if impl in ("tpu", "gpu"):
        heads = P(None, None, "tp", None)
        fn = functools.partial(_flash_after_prefix, impl=impl)
        return _per_shard(fn, mesh, (heads, heads, heads, P(None), P(None)), heads)(q, k, v, prefix_lengths, lengths)
    batch, seq, heads, head_dim = q.shape
    if seq <= QUERY_CHUNK:
        return _flash_after_prefix(q, k, v, prefix_lengths, lengths, impl="reference")
    chunks = -(-seq // QUERY_CHUNK)
    q = jnp.pad(q, ((0, 0), (0, chunks * QUERY_CHUNK - seq), (0, 0), (0, 0)))
    q_chunks = jnp.swapaxes(q.reshape(batch, chunks, QUERY_CHUNK, heads, head_dim), 0, 1)

    def one_chunk(args):
        index, q_chunk = args
        return _flash_after_prefix(q_chunk, k, v, prefix_lengths + index * QUERY_CHUNK, lengths, impl="reference")

    out = jax.lax.map(one_chunk, (jnp.arange(chunks, dtype=jnp.int32), q_chunks))
    return jnp.swapaxes(out, 0, 1).reshape(batch, chunks * QUERY_CHUNK, heads, head_dim)[:, :seq]


def _flash_after_prefix(q, k, v, query_start, lengths, *, impl):
    return pallas_kernels.flash_attention(q, k, v, lengths=lengths, causal=True, impl=impl, q_offsets=query_start)
