"""Paged attention at the edges of its contract, every implementation alike: a length past the
page table, page ids outside the cache, an empty batch, a GPU page size the Triton kernel
cannot tile; and the cache write for a position past the table."""

import os

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from test_kernels_common import GPU_INTERPRET, TOL, paged_numpy, rel_err  # noqa: E402

from splitserve import pallas_kernels  # noqa: E402
from splitserve.models import attention  # noqa: E402
from splitserve.models.kv_cache import SINK_PAGE, slot_addresses  # noqa: E402
from splitserve.pallas_kernels import (  # noqa: E402
    paged_attention, paged_attention_gpu, paged_attention_reference, paged_attention_tpu, paged_attention_xla,
)

IMPLS = {
    "reference": paged_attention_reference,
    "xla": paged_attention_xla,
    "tpu": lambda *a: paged_attention_tpu(*a, pages_per_compute_block=2, interpret=pltpu.InterpretParams()),
    "gpu": lambda *a: paged_attention_gpu(*a, interpret=GPU_INTERPRET),
}


def _cache(rng, total_pages, page_size, poisoned, kv_heads=2, heads=4, head_dim=16):
    """Random q and pages; the pages in `poisoned` are NaN (no row may read them)."""
    q = rng.standard_normal((1, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((kv_heads, total_pages, page_size, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv_heads, total_pages, page_size, head_dim)).astype(np.float32)
    for page in poisoned:
        k[:, page], v[:, page] = np.nan, np.nan
    return q, k, v


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_a_length_past_the_table_reads_only_the_rows_pages(impl):
    """Length 8 over a table of 3 pages of 2: the row has 6 tokens. The xla path padded its
    table to whole chunks with page 0 and counted those slots (NaN here) as tokens."""
    q, k, v = _cache(np.random.default_rng(0), total_pages=5, page_size=2, poisoned=[0, 2])
    table = np.array([[3, 1, 4]], np.int32)
    out = IMPLS[impl](jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.array([8], jnp.int32), jnp.asarray(table))
    want = paged_numpy(q, k, v, np.array([6]), table)
    assert rel_err(out, want) < TOL["float32"]


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_page_ids_outside_the_cache_are_clipped_alike(impl):
    """A caller's bug, but it must not read outside the cache (the TPU kernel's DMA did):
    every implementation reads the nearest end page, as the reference's gather."""
    q, k, v = _cache(np.random.default_rng(1), total_pages=4, page_size=2, poisoned=[])
    table = np.array([[7, -1, 2]], np.int32)
    out = IMPLS[impl](jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.array([5], jnp.int32), jnp.asarray(table))
    want = paged_numpy(q, k, v, np.array([5]), np.array([[3, 0, 2]]))
    assert rel_err(out, want) < TOL["float32"]


def test_an_empty_batch_gives_an_empty_result():
    q = jnp.zeros((0, 4, 16), jnp.float32)
    pages = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 2, 16)), jnp.float32)
    lengths, table = jnp.zeros((0,), jnp.int32), jnp.zeros((0, 2), jnp.int32)
    for impl in ("reference", "xla"):  # xla divided by zero
        assert paged_attention(q, pages, pages, lengths, table, impl=impl).shape == (0, 4, 16)


def test_auto_on_a_gpu_takes_xla_for_a_page_size_triton_cannot_tile(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pallas_kernels.resolve_impl("auto", page_size=12) == "xla"
    assert pallas_kernels.resolve_impl("auto", page_size=16) == "gpu"
    assert pallas_kernels.resolve_impl("auto") == "gpu"
    assert attention.model_attention_impl("auto", page_size=12) == "xla"  # it failed at the first decode
    assert attention.model_attention_impl("auto", page_size=8) == "gpu"
    assert attention.model_attention_impl("reference", page_size=12) == "reference"
    q, k, v = _cache(np.random.default_rng(3), total_pages=3, page_size=12, poisoned=[])
    table, lengths = np.array([[2, 0]], np.int32), np.array([17], np.int32)
    out = paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), jnp.asarray(table))
    assert rel_err(out, paged_numpy(q, k, v, lengths, table)) < TOL["float32"]


def test_a_cache_write_past_the_table_goes_to_the_sink_page():
    """Position 9 over a table of 2 pages of 4 used to land on column 1 (position 5's slot)."""
    table = jnp.array([[5, 6]], jnp.int32)
    positions = jnp.array([[5, 9]], jnp.int32)
    pages, slots = slot_addresses(table, positions, jnp.ones((1, 2), bool), page_size=4)
    assert pages.tolist() == [[6, SINK_PAGE]] and slots.tolist() == [[1, 0]]


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_kernels_run_in_a_program_with_jax_enable_x64(x64, jit):
    """Some users turn on 64-bit JAX for the rest of their program; the kernels' int32 index
    maths failed to trace there (a Python int became int64)."""
    from splitserve.pallas_kernels import (
        flash_attention_gpu, flash_attention_reference, flash_attention_tpu,
    )

    rng = np.random.default_rng(7)
    q, k, v = _cache(rng, total_pages=6, page_size=4, poisoned=[5])
    lengths, table = jnp.array([11], jnp.int32), jnp.array([[2, 0, 4]], jnp.int32)
    want = paged_numpy(q, k, v, np.array([11]), np.asarray(table))
    for impl in ("tpu", "gpu"):
        call = jax.jit(IMPLS[impl]) if jit else IMPLS[impl]
        out = call(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths, table)
        assert out.dtype == jnp.float32 and rel_err(out, want) < TOL["float32"], impl
    fq = jnp.asarray(rng.standard_normal((1, 12, 4, 16)), jnp.float32)
    fk, fv = (jnp.asarray(rng.standard_normal((1, 12, 2, 16)), jnp.float32) for _ in range(2))
    flash_lengths = jnp.array([9], jnp.int32)
    ref = np.asarray(flash_attention_reference(fq, fk, fv, lengths=flash_lengths))[:, :9]
    for name, kernel in (("tpu", lambda *a: flash_attention_tpu(*a, interpret=pltpu.InterpretParams())),
                         ("gpu", lambda *a: flash_attention_gpu(*a, interpret=GPU_INTERPRET))):
        call = jax.jit(kernel) if jit else kernel
        out = np.asarray(call(fq, fk, fv, flash_lengths))[:, :9]
        assert rel_err(out, ref) < TOL["float32"], name
