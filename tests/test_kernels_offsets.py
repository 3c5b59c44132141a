"""Flash attention with a query offset: the tokens after a cached prefix attend over the prefix
and themselves. q holds only the new tokens, row b's query i at key position q_offsets[b] + i;
k/v hold each row's whole prompt. Every kernel is held to the float64 numpy reference on random
inputs, with NaN in k/v past each row's length and in q rows past it (bucket padding)."""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from test_kernels_common import GPU_INTERPRET, TOL, flash_numpy, rel_err  # noqa: E402

from splitserve.pallas_kernels import (  # noqa: E402
    flash_attention,
    flash_attention_gpu,
    flash_attention_reference,
    flash_attention_tpu,
    flash_attention_xla,
)


def offset_inputs(rng, *, batch, q_seq, seq, heads, kv_heads, head_dim, offsets, lengths, dtype):
    """(q, k, v, lengths, offsets) poisoned with NaN past each row's length, and clean float64 copies."""
    dtype = jnp.dtype(dtype)
    lengths, offsets = np.asarray(lengths, np.int32), np.asarray(offsets, np.int32)
    clean = [jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
             for shape in ((batch, q_seq, heads, head_dim), (batch, seq, kv_heads, head_dim),
                           (batch, seq, kv_heads, head_dim))]
    q_pos = offsets[:, None] + np.arange(q_seq)[None, :]
    kv_pos = np.broadcast_to(np.arange(seq)[None, :], (batch, seq))
    poisoned = [jnp.where(jnp.asarray(pos >= lengths[:, None])[:, :, None, None], jnp.nan, x).astype(dtype)
                for x, pos in zip(clean, (q_pos, kv_pos, kv_pos))]
    as64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in clean]
    return (*poisoned, jnp.asarray(lengths), jnp.asarray(offsets)), as64


def _valid(offsets, lengths, shape):
    rows = np.asarray(offsets)[:, None] + np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.broadcast_to(rows[:, :, None, None], shape)


def _check(kernel, case, seed=0, **kwargs):
    batch, q_seq, seq, heads, kv_heads, head_dim, offsets, lengths, dtype = case[:9]
    (q, k, v, lens, offs), (q64, k64, v64) = offset_inputs(
        np.random.default_rng(seed), batch=batch, q_seq=q_seq, seq=seq, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, offsets=offsets, lengths=lengths, dtype=dtype)
    out = kernel(q, k, v, lens, q_offsets=offs, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = flash_numpy(q64, k64, v64, lengths, q_offsets=offsets)
    err = rel_err(out, ref, _valid(offsets, lengths, ref.shape))
    assert err < TOL[dtype], f"rel err {err:.3g}"


# (batch, q_seq, seq, heads, kv_heads, head_dim, offsets, lengths, dtype, block_q, block_k)
CASES = [
    # ragged offsets (mid-block, none, a block multiple); row 1 has fewer queries than q_seq
    (3, 24, 64, 4, 2, 64, [40, 0, 16], [64, 20, 33], "float32", 8, 16),
    (2, 16, 48, 8, 1, 40, [32, 31], [48, 40], "bfloat16", 16, 16),  # MQA, head_dim 40
    (2, 8, 40, 8, 8, 128, [39, 8], [40, 16], "float32", 8, 8),  # one new token after 39
    (1, 33, 96, 8, 4, 128, [50], [83], "bfloat16", 16, 32),  # q not a block multiple
    (2, 20, 72, 8, 1, 64, [52, 5], [72, 25], "float32", 128, 128),  # GQA 8, default-size blocks
]


def test_flash_tpu_with_offsets_in_tpu_interpret_mode():
    _check(flash_attention_tpu, (2, 8, 24, 4, 2, 64, [16, 3], [24, 10], "float32"),
           block_q=8, block_k=8, interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_tpu_with_offsets(case):
    _check(flash_attention_tpu, case, block_q=case[9], block_k=case[10], interpret=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_gpu_with_offsets(case):
    _check(flash_attention_gpu, case, block_q=max(case[9], 16), block_k=max(case[10], 16),
           interpret=GPU_INTERPRET)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_xla_with_offsets(case):
    _check(flash_attention_xla, case, query_block=8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_reference_with_offsets(dtype):
    _check(lambda q, k, v, lens, **kw: flash_attention_reference(q, k, v, lengths=lens, **kw),
           (3, 12, 30, 6, 2, 40, [18, 0, 7], [30, 9, 19], dtype))


def test_offsets_of_zero_are_a_whole_prompt():
    """q_offsets of 0 and q as long as k/v: the same numbers as no offsets, in each kernel."""
    (q, k, v, lens, offs), _ = offset_inputs(np.random.default_rng(5), batch=2, q_seq=24, seq=24, heads=4,
                                             kv_heads=2, head_dim=64, offsets=[0, 0], lengths=[24, 13],
                                             dtype="float32")
    valid = _valid([0, 0], [24, 13], q.shape)
    for kernel, kw in ((flash_attention_tpu, dict(block_q=8, block_k=8, interpret=True)),
                       (flash_attention_gpu, dict(interpret=GPU_INTERPRET))):
        with_offsets = np.asarray(kernel(q, k, v, lens, q_offsets=offs, **kw))[valid]
        np.testing.assert_array_equal(with_offsets, np.asarray(kernel(q, k, v, lens, **kw))[valid])


def test_offsets_out_of_range_are_clipped_alike():
    """Below 0 counts as 0; past seq (up to int32's end) every query is padding (its output is
    unspecified) and no kernel reads outside k/v: the TPU interpreter raises on an out-of-bounds
    block, which an offset near 2**31 made before the clip."""
    (q, k, v, lens, _), _ = offset_inputs(np.random.default_rng(7), batch=2, q_seq=16, seq=32, heads=2, kv_heads=2,
                                          head_dim=32, offsets=[0, 0], lengths=[32, 32], dtype="float32")
    offs = jnp.asarray([-3, 2**31 - 4], jnp.int32)
    ref = np.asarray(flash_attention_reference(q, k, v, lengths=lens, q_offsets=offs))
    want = np.asarray(flash_attention_reference(q, k, v, lengths=lens, q_offsets=jnp.asarray([0, 32], jnp.int32)))
    np.testing.assert_array_equal(ref, want)
    for out in (flash_attention_tpu(q, k, v, lens, q_offsets=offs, block_q=8, block_k=8,
                                    interpret=pltpu.InterpretParams()),
                flash_attention_gpu(q, k, v, lens, q_offsets=offs, interpret=GPU_INTERPRET)):
        assert rel_err(np.asarray(out)[:1], ref[:1].astype(np.float64)) < TOL["float32"]


def test_public_flash_with_offsets():
    (q, k, v, lens, offs), (q64, k64, v64) = offset_inputs(
        np.random.default_rng(6), batch=2, q_seq=8, seq=32, heads=4, kv_heads=2, head_dim=64,
        offsets=[24, 9], lengths=[32, 17], dtype="float32")
    ref = flash_numpy(q64, k64, v64, [32, 17], q_offsets=[24, 9])
    valid = _valid([24, 9], [32, 17], q.shape)
    assert rel_err(flash_attention(q, k, v, lengths=lens, q_offsets=offs), ref, valid) < TOL["float32"]
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        tpu = flash_attention(q, k, v, lengths=lens, q_offsets=offs, impl="tpu")
    assert rel_err(tpu, ref, valid) < TOL["float32"]


def test_flash_kernels_with_offsets_lower_for_tpu_and_cuda():
    """Cross-platform lowering of the offset kernels: Mosaic TPU and Triton IR are generated here."""
    q = jax.ShapeDtypeStruct((2, 24, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((2,), jnp.int32)
    for platform, kernel, target in (
        ("tpu", flash_attention_tpu, "tpu_custom_call"),
        ("cuda", flash_attention_gpu, "__gpu$xla.gpu.triton"),
    ):
        exported = jax.export.export(
            jax.jit(lambda q, k, v, lens, offs: kernel(q, k, v, lens, q_offsets=offs)), platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
        )(q, k, k, ints, ints)
        assert target in exported.mlir_module()
