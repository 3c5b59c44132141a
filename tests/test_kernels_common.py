"""Shared helpers for the kernel tests: float64 numpy references, random poisoned inputs.

The numpy references are the ground truth for every kernel test; the tests at the
bottom of this file check them by hand-computable cases and check the plain-JAX
references (pallas_kernels/reference.py) against them.
"""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from splitserve.pallas_kernels import (  # noqa: E402
    flash_attention_reference,
    paged_attention_reference,
)

TOL = {"float32": 1e-5, "bfloat16": 2e-2}

# The GPU kernels compile for a real GPU when the tests run on one
# (SPLITSERVE_TEST_PLATFORM=cuda pytest tests/test_kernels_paged.py tests/test_kernels_flash.py -k gpu),
# and run in Pallas's interpret mode everywhere else.
ON_GPU = jax.default_backend() == "gpu"
GPU_INTERPRET = None if ON_GPU else True


# ---------------------------------------------------------------- numpy references


def flash_numpy(q, k, v, lengths, *, causal=True, sm_scale=None, q_offsets=None):
    """float64 attention. q [b, q_seq, h, d], k/v [b, s, kvh, d] -> [b, q_seq, h, d]; row b's query i
    sits at position q_offsets[b] + i (0 + i without offsets); NaN where that is past the length."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_seq, heads, head_dim = q.shape
    group = heads // k.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    out = np.full(q.shape, np.nan)
    for b in range(batch):
        n = int(lengths[b])
        first = 0 if q_offsets is None else int(q_offsets[b])
        for i in range(max(0, min(q_seq, n - first))):
            keys = first + i + 1 if causal else n
            s = np.einsum("hd,thd->ht", q[b, i], k[b, :keys]) * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[b, i] = np.einsum("ht,thd->hd", p, v[b, :keys])
    return out


def paged_numpy(q, k_pages, v_pages, lengths, page_indices, *, sm_scale=None):
    """float64 decode attention over a paged cache. Returns [batch, heads, head_dim]."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    batch, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = np.empty(q.shape)
    for b in range(batch):
        n = int(lengths[b])
        pages = np.asarray(page_indices[b, : -(-n // page_size)])
        k = k_pages[:, pages].reshape(kv_heads, -1, head_dim)[:, :n]  # [kvh, n, d]
        v = v_pages[:, pages].reshape(kv_heads, -1, head_dim)[:, :n]
        for h in range(heads):
            s = k[h // group] @ q[b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[h // group]
    return out


def rel_err(out, ref, valid=None):
    """max |out - ref| / max |ref| over `valid` entries (all if None)."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    if valid is not None:
        out, ref = out[valid], ref[valid]
    assert np.all(np.isfinite(out)), "kernel output has NaN/inf where it must be finite"
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------- random inputs


def _normal(rng, shape, dtype):
    """Random normal data rounded to `dtype`, plus its float64 value after rounding."""
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def prefill_inputs(rng, *, batch, seq, heads, kv_heads, head_dim, lengths, dtype):
    """Random q, k, v with NaN at every position past a row's length.

    Returns (q, k, v, lengths) for the kernel (poisoned) and (q64, k64, v64) clean.
    """
    lengths = np.asarray(lengths, np.int32)
    q, q64 = _normal(rng, (batch, seq, heads, head_dim), dtype)
    k, k64 = _normal(rng, (batch, seq, kv_heads, head_dim), dtype)
    v, v64 = _normal(rng, (batch, seq, kv_heads, head_dim), dtype)
    pad = jnp.asarray(np.arange(seq)[None, :, None, None] >= lengths[:, None, None, None])
    q, k, v = (jnp.where(pad, jnp.nan, x).astype(dtype) for x in (q, k, v))
    return (q, k, v, jnp.asarray(lengths)), (q64, k64, v64)


def prefill_valid(lengths, shape):
    """Boolean mask [b, s, h, d] of output positions below each row's length."""
    rows = np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.broadcast_to(rows[:, :, None, None], shape)


def paged_inputs(
    rng, *, batch, heads, kv_heads, head_dim, page_size, pages_per_seq, lengths, dtype,
    spare_pages=3, garbage_ids=False,
):
    """Random paged cache with a shuffled page table; every slot no sequence reads is NaN.

    Page-table entries past a sequence's last page point at NaN pages, or with
    `garbage_ids` at indices far outside the cache. Returns
    (q, k_pages, v_pages, lengths, page_indices) and the float64 (q64, k64, v64).
    """
    lengths = np.asarray(lengths, np.int32)
    total = batch * pages_per_seq + spare_pages
    q, q64 = _normal(rng, (batch, heads, head_dim), dtype)
    k, k64 = _normal(rng, (kv_heads, total, page_size, head_dim), dtype)
    v, v64 = _normal(rng, (kv_heads, total, page_size, head_dim), dtype)
    table = rng.permutation(total)[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    used = np.zeros((total, page_size), bool)
    for b in range(batch):
        for t in range(lengths[b]):
            used[table[b, t // page_size], t % page_size] = True
        if garbage_ids:
            table[b, -(-lengths[b] // page_size):] = 10**6 + b
    poison = jnp.asarray(~used)[None, :, :, None]
    k, v = (jnp.where(poison, jnp.nan, x).astype(dtype) for x in (k, v))
    inputs = (q, k, v, jnp.asarray(lengths), jnp.asarray(table.astype(np.int32)))
    return inputs, (q64, k64, v64)


# ---------------------------------------------------------------- the references themselves


def test_numpy_references_by_hand():
    """Length 1 attends to one token: the output is that token's V, for any q and K."""
    rng = np.random.default_rng(0)
    (q, k, v, lengths), (_, _, v64) = prefill_inputs(
        rng, batch=1, seq=4, heads=4, kv_heads=2, head_dim=8, lengths=[4], dtype=jnp.float32
    )
    out = flash_numpy(q, k, v, lengths)
    np.testing.assert_allclose(out[0, 0], np.repeat(v64[0, 0], 2, axis=0), rtol=1e-12)
    # Two equal keys -> equal weights -> mean of the two values.
    k2 = np.ones((1, 2, 1, 8))
    v2 = np.stack([np.full(8, 1.0), np.full(8, 3.0)])[None, :, None, :]
    q2 = rng.standard_normal((1, 2, 1, 8))
    np.testing.assert_allclose(flash_numpy(q2, k2, v2, [2])[0, 1, 0], np.full(8, 2.0))
    paged = paged_numpy(q2[:, 1], k2.reshape(1, 1, 2, 8), v2.reshape(1, 1, 2, 8), [2], np.zeros((1, 1), int))
    np.testing.assert_allclose(paged[0, 0], np.full(8, 2.0))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_reference_matches_numpy(causal, dtype):
    rng = np.random.default_rng(1)
    (q, k, v, lengths), (q64, k64, v64) = prefill_inputs(
        rng, batch=3, seq=19, heads=8, kv_heads=2, head_dim=40, lengths=[19, 1, 11],
        dtype=jnp.dtype(dtype),
    )
    out = flash_attention_reference(q, k, v, lengths=lengths, causal=causal)
    ref = flash_numpy(q64, k64, v64, np.asarray(lengths), causal=causal)
    assert rel_err(out, ref, prefill_valid(lengths, ref.shape)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_reference_matches_numpy(dtype):
    rng = np.random.default_rng(2)
    inputs, (q64, k64, v64) = paged_inputs(
        rng, batch=3, heads=8, kv_heads=2, head_dim=40, page_size=8, pages_per_seq=4,
        lengths=[1, 16, 29], dtype=jnp.dtype(dtype),
    )
    out = paged_attention_reference(*inputs)
    ref = paged_numpy(q64, k64, v64, inputs[3], inputs[4])
    assert rel_err(out, ref) < TOL[dtype]
