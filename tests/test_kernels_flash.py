"""Prefill flash attention kernels (TPU and GPU Pallas) against the float64 numpy reference.

Inputs are random normal with NaN in q, k and v at every position past a row's
length; only rows below the length are compared (the rest are unspecified).
TPU kernels run in TPU interpret mode (simulated VMEM/DMA) on small cases and in
the fast `interpret=True` mode for the wider sweep; GPU kernels in `interpret=True`, or compiled when the tests
run on a GPU (SPLITSERVE_TEST_PLATFORM=cuda).
"""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from test_kernels_common import (  # noqa: E402
    GPU_INTERPRET, ON_GPU, TOL, flash_numpy, prefill_inputs, prefill_valid, rel_err,
)

from splitserve.pallas_kernels import (  # noqa: E402
    flash_attention,
    flash_attention_gpu,
    flash_attention_reference,
    flash_attention_tpu,
    flash_attention_xla,
)
from splitserve.pallas_kernels.flash_tpu import _last_k_block  # noqa: E402


def _check(kernel, *, batch, seq, heads, kv_heads, head_dim, lengths, dtype, causal=True,
           seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    (q, k, v, lens), (q64, k64, v64) = prefill_inputs(
        rng, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        lengths=lengths, dtype=jnp.dtype(dtype),
    )
    out = kernel(q, k, v, lens, causal=causal, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = flash_numpy(q64, k64, v64, lengths, causal=causal)
    err = rel_err(out, ref, prefill_valid(lengths, ref.shape))
    assert err < TOL[dtype], f"rel err {err:.3g}"
    return err


# (batch, seq, heads, kv_heads, head_dim, lengths, dtype, causal, block_q, block_k)
TPU_SIM_CASES = [
    (2, 40, 4, 2, 64, [40, 17], "float32", True, 16, 8),  # ragged, several k blocks per q block
    (1, 24, 4, 1, 40, [24], "bfloat16", True, 8, 8),  # MQA, head_dim padded to 128
    (2, 16, 2, 2, 128, [1, 16], "float32", False, 8, 8),  # length 1, non-causal
]


@pytest.mark.parametrize("case", TPU_SIM_CASES, ids=str)
def test_flash_tpu_in_tpu_interpret_mode(case):
    batch, seq, heads, kv_heads, head_dim, lengths, dtype, causal, bq, bk = case
    _check(
        flash_attention_tpu, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, lengths=lengths, dtype=dtype, causal=causal,
        block_q=bq, block_k=bk, interpret=pltpu.InterpretParams(),
    )


# Wider sweep: GQA ratio 1/2/4/8, head_dim 40/64/128, f32/bf16, lengths full/1/ragged/
# a block multiple, causal and not, default and small blocks.
SWEEP = [
    (2, 37, 2, 2, 40, [37, 5], "float32", True, 16, 16),
    (2, 64, 4, 2, 64, [64, 32], "float32", True, 16, 32),
    (1, 50, 8, 2, 128, [33], "float32", False, 32, 16),
    (3, 33, 8, 1, 64, [1, 33, 16], "float32", True, 128, 128),
    (2, 48, 4, 1, 128, [48, 47], "bfloat16", True, 16, 16),
    (2, 29, 8, 8, 40, [29, 8], "bfloat16", False, 8, 16),
    (1, 160, 8, 1, 64, [150], "bfloat16", True, 128, 128),
]


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_flash_tpu_sweep(case):
    batch, seq, heads, kv_heads, head_dim, lengths, dtype, causal, bq, bk = case
    _check(
        flash_attention_tpu, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, lengths=lengths, dtype=dtype, causal=causal,
        block_q=bq, block_k=bk, interpret=True,
    )


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_flash_gpu_sweep(case):
    batch, seq, heads, kv_heads, head_dim, lengths, dtype, causal, bq, bk = case
    _check(
        flash_attention_gpu, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, lengths=lengths, dtype=dtype, causal=causal,
        block_q=max(bq, 16), block_k=max(bk, 16), interpret=GPU_INTERPRET,
    )


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_flash_xla_sweep(case):
    """The CPU path, query blocks of block_q (several per prompt; causal ones cut their keys)."""
    batch, seq, heads, kv_heads, head_dim, lengths, dtype, causal, _, _ = case
    _check(flash_attention_xla, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
           lengths=lengths, dtype=dtype, causal=causal, query_block=max(16, -(-seq // 4)))  # 2 to 4 blocks


def test_flash_xla_caps_its_blocks_and_keeps_a_short_prompt_whole(monkeypatch):
    """At most MAX_BLOCKS blocks (larger ones past that); a prompt within one block is the reference's."""
    from splitserve.pallas_kernels import flash_xla

    monkeypatch.setattr(flash_xla, "MAX_BLOCKS", 4)  # few blocks to compile
    _check(flash_attention_xla, batch=1, seq=38, heads=4, kv_heads=2, head_dim=64, lengths=[35], dtype="float32",
           query_block=2)  # 38 / 4 blocks: blocks of 10, the last of 8
    traced = jax.make_jaxpr(lambda q, k, v: flash_attention_xla(q, k, v, query_block=2))(
        *(jnp.ones((1, 38, 2, 8)),) * 3)
    assert str(traced).count("dot_general") == 2 * 4
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 24, 4, 32)), jnp.float32) for _ in range(3))
    lens = jnp.asarray([24, 9], jnp.int32)
    np.testing.assert_array_equal(np.asarray(flash_attention_xla(q, k, v, lens, query_block=32)),
                                  np.asarray(flash_attention_reference(q, k, v, lengths=lens)))


# Prompt shapes, compiled on a real GPU only: 32/8 heads of 128, ragged lengths, default blocks.
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (SPLITSERVE_TEST_PLATFORM=cuda)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_gpu_prompt_shapes(dtype):
    _check(
        flash_attention_gpu, batch=2, seq=1000, heads=32, kv_heads=8, head_dim=128,
        lengths=[1000, 357], dtype=dtype,
    )


def test_flash_without_lengths_and_custom_scale():
    rng = np.random.default_rng(3)
    (q, k, v, _), (q64, k64, v64) = prefill_inputs(
        rng, batch=2, seq=24, heads=4, kv_heads=2, head_dim=64, lengths=[24, 24],
        dtype=jnp.float32,
    )
    ref = flash_numpy(q64, k64, v64, [24, 24], sm_scale=0.3)
    for kernel, kw in ((flash_attention_tpu, dict(block_q=8, block_k=8)), (flash_attention_gpu, {})):
        interpret = GPU_INTERPRET if kernel is flash_attention_gpu else True
        out = kernel(q, k, v, sm_scale=0.3, interpret=interpret, **kw)
        assert rel_err(out, ref) < TOL["float32"]


def test_last_k_block_skips_masked_blocks():
    """The K/V index_map stops at the last block a q tile needs (so later ones are not copied)."""
    last = lambda length, q_first, causal: int(  # noqa: E731
        _last_k_block(jnp.int32(length), jnp.int32(q_first), block_q=16, block_k=8, causal=causal)
    )
    assert last(64, 0, True) == 1  # q rows 0..15 need keys 0..15: blocks 0, 1
    assert last(64, 16, True) == 3
    assert last(64, 21, True) == 4  # a q offset: rows at 21..36 need keys up to 36
    assert last(20, 16, True) == 2  # keys 0..19 only
    assert last(20, 48, False) == 0  # a q tile wholly past the length fetches nothing more
    assert last(64, 0, False) == 7
    assert last(0, 32, True) == 0  # empty row: clamp to block 0, never negative


def test_public_flash_dispatch():
    rng = np.random.default_rng(4)
    (q, k, v, lens), _ = prefill_inputs(
        rng, batch=2, seq=16, heads=4, kv_heads=2, head_dim=64, lengths=[16, 9],
        dtype=jnp.float32,
    )
    ref = flash_attention_reference(q, k, v, lengths=lens)
    valid = prefill_valid(np.asarray(lens), q.shape)
    auto = flash_attention(q, k, v, lengths=lens)  # cpu -> reference
    np.testing.assert_array_equal(np.asarray(auto)[valid], np.asarray(ref)[valid])
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        tpu = flash_attention(q, k, v, lengths=lens, impl="tpu")
    assert rel_err(tpu, np.asarray(ref, np.float64), valid) < TOL["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_kernels_lower_for_tpu_and_cuda(dtype):
    """Cross-platform lowering: Mosaic TPU and Triton IR are generated (not compiled) here."""
    q = jax.ShapeDtypeStruct((2, 70, 4, 40), jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((2, 70, 2, 40), jnp.dtype(dtype))
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    for platform, kernel, target in (
        ("tpu", flash_attention_tpu, "tpu_custom_call"),
        ("cuda", flash_attention_gpu, "__gpu$xla.gpu.triton"),
    ):
        exported = jax.export.export(
            jax.jit(kernel), platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
        )(q, k, k, lens)
        assert target in exported.mlir_module()
