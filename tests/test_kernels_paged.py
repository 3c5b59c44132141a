"""Paged decode attention kernels (TPU and GPU Pallas, and the CPU's plain-JAX "xla" version)
against the float64 numpy reference.

Every cache slot that no sequence reads is NaN (foreign pages, spare pages, slots
past a length inside a sequence's last page), and page tables are shuffled, so a
wrong page, a missing mask on scores or V, or a read before a DMA lands shows up
as NaN or a wrong number.
"""

import functools
import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from test_kernels_common import GPU_INTERPRET, ON_GPU, TOL, paged_inputs, paged_numpy, rel_err  # noqa: E402

from splitserve.pallas_kernels import (  # noqa: E402
    paged_attention,
    paged_attention_gpu,
    paged_attention_reference,
    paged_attention_tpu,
    paged_attention_xla,
)


def _check(kernel, *, batch, heads, kv_heads, head_dim, page_size, pages_per_seq, lengths,
           dtype, garbage_ids=False, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    inputs, (q64, k64, v64) = paged_inputs(
        rng, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_seq=pages_per_seq, lengths=lengths,
        dtype=jnp.dtype(dtype), garbage_ids=garbage_ids,
    )
    out = kernel(*inputs, **kwargs)
    assert out.shape == inputs[0].shape and out.dtype == inputs[0].dtype
    ref = paged_numpy(q64, k64, v64, inputs[3], inputs[4])
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3g}"
    return err


# (batch, heads, kv_heads, head_dim, page_size, pages_per_seq, lengths, dtype, ppcb, num_buffers)
# Lengths: 1, exact page multiples, ragged, the full capacity.
TPU_SIM_CASES = [
    (3, 4, 2, 64, 8, 5, [1, 16, 37], "float32", 2, 2),  # 5 pages, 2 per block: a partial block
    (2, 8, 1, 128, 16, 3, [48, 20], "bfloat16", 1, 2),  # group 8 (MQA), full capacity
    (2, 2, 2, 40, 32, 2, [33, 64], "float32", 4, 3),  # ppcb > pages: clamped; triple buffering
]


@pytest.mark.parametrize("case", TPU_SIM_CASES, ids=str)
def test_paged_tpu_in_tpu_interpret_mode(case):
    batch, heads, kv_heads, head_dim, page_size, pps, lengths, dtype, ppcb, nbuf = case
    _check(
        paged_attention_tpu, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_seq=pps, lengths=lengths, dtype=dtype,
        pages_per_compute_block=ppcb, num_buffers=nbuf, interpret=pltpu.InterpretParams(),
    )


def test_paged_tpu_has_no_races():
    """Race detector on the double-buffered DMA loop (garbage page ids past the lengths)."""
    tpu_interpret.reset_tpu_interpret_mode_state()
    _check(
        paged_attention_tpu, batch=2, heads=4, kv_heads=2, head_dim=64, page_size=8,
        pages_per_seq=4, lengths=[27, 9], dtype="float32", garbage_ids=True,
        pages_per_compute_block=1, interpret=pltpu.InterpretParams(detect_races=True),
    )
    assert tpu_interpret.races is not None, "race detection did not run"
    assert not tpu_interpret.races.races_found


# Wider sweep: GQA 1/2/4/8, head_dim 40/64/128, page_size 8/16/32, f32/bf16.
SWEEP = [
    (4, 2, 2, 40, 8, 6, [1, 8, 48, 21], "float32", 2),
    (3, 8, 2, 64, 16, 4, [64, 17, 1], "float32", 4),
    (2, 16, 2, 128, 32, 3, [96, 50], "float32", 1),
    (3, 8, 1, 64, 8, 7, [56, 3, 40], "float32", 3),
    (2, 4, 4, 128, 16, 5, [80, 33], "bfloat16", 2),
    (3, 32, 4, 40, 32, 2, [1, 64, 31], "bfloat16", 2),
    (2, 8, 2, 64, 8, 9, [72, 65], "bfloat16", 8),
]


@pytest.mark.parametrize("garbage_ids", [False, True])
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_paged_tpu_sweep(case, garbage_ids):
    batch, heads, kv_heads, head_dim, page_size, pps, lengths, dtype, ppcb = case
    _check(
        paged_attention_tpu, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_seq=pps, lengths=lengths, dtype=dtype,
        garbage_ids=garbage_ids, pages_per_compute_block=ppcb, interpret=True,
    )


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_paged_gpu_sweep(case, num_splits):
    batch, heads, kv_heads, head_dim, page_size, pps, lengths, dtype, ppcb = case
    _check(
        paged_attention_gpu, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_seq=pps, lengths=lengths, dtype=dtype,
        garbage_ids=num_splits == 3, pages_per_compute_block=ppcb, num_splits=num_splits,
        interpret=GPU_INTERPRET,
    )


# Serving shapes, compiled on a real GPU only (interpret mode would take minutes): batch 64,
# 32/8 heads of 128, pages of 16, ragged lengths up to 2k, NaN in every unread slot.
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (SPLITSERVE_TEST_PLATFORM=cuda)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_paged_gpu_serving_shapes(dtype, num_splits):
    lengths = np.random.default_rng(11).integers(1, 2049, 64)
    lengths[:3] = [1, 16, 2048]
    _check(
        paged_attention_gpu, batch=64, heads=32, kv_heads=8, head_dim=128, page_size=16,
        pages_per_seq=128, lengths=lengths, dtype=dtype, num_splits=num_splits, garbage_ids=True,
    )


@pytest.mark.parametrize("chunking", [(1, 1), (3, 2), (2, "case"), "default"], ids=str)
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_paged_xla_sweep(case, chunking):
    """The CPU version, jitted as the model runs it, with (pages per chunk, chunks per block) of
    (1, 1), (3, 2) (partial chunks and blocks that hold several rows, garbage page ids past the
    lengths), (2, the case's ppcb), and its defaults."""
    batch, heads, kv_heads, head_dim, page_size, pps, lengths, dtype, ppcb = case
    kwargs = {} if chunking == "default" else {
        "pages_per_chunk": chunking[0], "chunks_per_block": ppcb if chunking[1] == "case" else chunking[1]}
    _check(
        jax.jit(functools.partial(paged_attention_xla, **kwargs)), batch=batch, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, page_size=page_size, pages_per_seq=pps, lengths=lengths, dtype=dtype,
        garbage_ids=chunking == (3, 2),
    )


@pytest.mark.parametrize("chunks_per_block", [1, 2, 5, None])
@pytest.mark.parametrize("pages_per_chunk", [1, 2, 4])
def test_paged_xla_one_long_row_among_short_ones(pages_per_chunk, chunks_per_block):
    """The serving case the flat work list is for: short rows around one long one (here in the
    middle, so blocks hold the end of one row and the start of the next), rows of one token, a
    row that ends exactly on a chunk, garbage page ids past every length."""
    lengths = [3, 17, 1, 200, 9, 16, 1, 40]
    _check(
        jax.jit(functools.partial(paged_attention_xla, pages_per_chunk=pages_per_chunk,
                                  chunks_per_block=chunks_per_block)),
        batch=8, heads=8, kv_heads=2, head_dim=32, page_size=8, pages_per_seq=25, lengths=lengths,
        dtype="float32", garbage_ids=True, seed=3,
    )


def test_paged_xla_ignores_a_padded_table():
    """A table padded far past every length with NaN pages (as a width bucket pads it) gives the
    same output as the tight table, bit for bit."""
    rng = np.random.default_rng(7)
    inputs, _ = paged_inputs(rng, batch=3, heads=8, kv_heads=2, head_dim=64, page_size=8,
                             pages_per_seq=3, lengths=[20, 7, 24], dtype=jnp.float32, spare_pages=40)
    q, k, v, lengths, table = inputs
    unused = np.setdiff1d(np.arange(k.shape[1]), np.asarray(table)).astype(np.int32)  # all NaN
    assert np.isnan(np.asarray(k)[:, unused]).all()
    padded = np.concatenate([np.asarray(table), np.broadcast_to(unused[:13], (3, 13))], axis=1)
    tight = paged_attention_xla(q, k, v, lengths, table, chunks_per_block=2)
    wide = paged_attention_xla(q, k, v, lengths, jnp.asarray(padded), chunks_per_block=2)
    np.testing.assert_array_equal(np.asarray(wide), np.asarray(tight))
    assert np.isfinite(np.asarray(wide)).all()


def test_paged_xla_default_block_is_about_2_mib_of_k():
    from splitserve.pallas_kernels.paged_xla import default_chunks_per_block

    assert default_chunks_per_block(kv_heads=4, page_size=16, head_dim=64, pages_per_chunk=2) == 64  # 32 KiB chunks
    assert default_chunks_per_block(kv_heads=4, page_size=16, head_dim=32, pages_per_chunk=2) == 128
    assert default_chunks_per_block(kv_heads=8, page_size=64, head_dim=128, pages_per_chunk=8) == 1  # never 0


@pytest.mark.parametrize("bad", [{"pages_per_chunk": 0}, {"chunks_per_block": 0}], ids=str)
def test_paged_xla_rejects_a_bad_chunking(bad):
    rng = np.random.default_rng(8)
    inputs, _ = paged_inputs(rng, batch=1, heads=2, kv_heads=1, head_dim=8, page_size=8,
                             pages_per_seq=2, lengths=[9], dtype=jnp.float32)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        paged_attention_xla(*inputs, **bad)


def test_paged_custom_scale():
    rng = np.random.default_rng(5)
    inputs, (q64, k64, v64) = paged_inputs(
        rng, batch=2, heads=4, kv_heads=2, head_dim=64, page_size=8, pages_per_seq=3,
        lengths=[20, 7], dtype=jnp.float32,
    )
    ref = paged_numpy(q64, k64, v64, inputs[3], inputs[4], sm_scale=0.2)
    for kernel in (paged_attention_tpu, paged_attention_gpu):
        interpret = GPU_INTERPRET if kernel is paged_attention_gpu else True
        assert rel_err(kernel(*inputs, sm_scale=0.2, interpret=interpret), ref) < TOL["float32"]
    assert rel_err(paged_attention_xla(*inputs, sm_scale=0.2), ref) < TOL["float32"]


def test_public_paged_dispatch():
    rng = np.random.default_rng(6)
    inputs, _ = paged_inputs(
        rng, batch=2, heads=4, kv_heads=2, head_dim=64, page_size=8, pages_per_seq=3,
        lengths=[24, 5], dtype=jnp.float32,
    )
    ref = paged_attention_reference(*inputs)
    np.testing.assert_array_equal(np.asarray(paged_attention(*inputs)), np.asarray(ref))
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        tpu = paged_attention(*inputs, impl="tpu")
    assert rel_err(tpu, np.asarray(ref, np.float64)) < TOL["float32"]
    assert rel_err(paged_attention(*inputs, impl="xla"), np.asarray(ref, np.float64)) < TOL["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_kernels_lower_for_tpu_and_cuda(dtype):
    """Cross-platform lowering: Mosaic TPU and Triton IR are generated (not compiled) here."""
    q = jax.ShapeDtypeStruct((3, 8, 128), jnp.dtype(dtype))
    pages = jax.ShapeDtypeStruct((2, 20, 16, 128), jnp.dtype(dtype))
    lens = jax.ShapeDtypeStruct((3,), jnp.int32)
    table = jax.ShapeDtypeStruct((3, 5), jnp.int32)
    for platform, kernel, target in (
        ("tpu", paged_attention_tpu, "tpu_custom_call"),
        ("cuda", paged_attention_gpu, "__gpu$xla.gpu.triton"),
    ):
        exported = jax.export.export(
            jax.jit(kernel), platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
        )(q, pages, pages, lens, table)
        assert target in exported.mlir_module()
