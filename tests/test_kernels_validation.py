"""Input validation of the public kernel entry points: each bad input, its message."""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from splitserve.pallas_kernels import flash_attention, paged_attention, resolve_impl  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16


def _arr(shape, dtype=F32):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


def _flash(q=(2, 8, 4, 64), kv=(2, 8, 2, 64), dtype=F32, lengths=None, **kw):
    k = _arr(kv, kw.pop("k_dtype", dtype))
    v = _arr(kw.pop("v_shape", kv), dtype)
    return flash_attention(_arr(q, dtype), k, v, lengths=lengths, impl=kw.pop("impl", "reference"), **kw)


def _paged(q=(2, 4, 64), pages=(2, 6, 8, 64), lengths=None, table=None, dtype=F32, **kw):
    lengths = jnp.array([3, 9], jnp.int32) if lengths is None else lengths
    table = jnp.zeros((2, 3), jnp.int32) if table is None else table
    k = _arr(pages, kw.pop("k_dtype", dtype))
    v = _arr(kw.pop("v_shape", pages), dtype)
    return paged_attention(_arr(q, dtype), k, v, lengths, table, impl=kw.pop("impl", "reference"), **kw)


FLASH_ERRORS = [
    (dict(q=(2, 8, 64)), "q must have rank 4 [batch, seq, heads, head_dim], got shape (2, 8, 64)"),
    (dict(kv=(2, 8, 64)), "k must have rank 4"),
    (dict(kv=(2, 8, 3, 64)), "heads (4) must be a multiple of kv_heads (3)"),
    (dict(q=(2, 8, 4, 320), kv=(2, 8, 2, 320)), "head_dim must be in [1, 256], got 320"),
    (dict(kv=(2, 7, 2, 64)), "k shape (2, 7, 2, 64) must be [batch=2, seq=8, kv_heads, head_dim=64]"),
    (dict(kv=(2, 8, 2, 32)), "must be [batch=2, seq=8, kv_heads, head_dim=64]"),
    (dict(v_shape=(2, 8, 1, 64)), "k shape (2, 8, 2, 64) and v shape (2, 8, 1, 64) must be equal"),
    (dict(dtype=jnp.float16), "q dtype must be float32 or bfloat16, got float16"),
    (dict(k_dtype=BF16), "k dtype bfloat16 must match q dtype float32"),
    (dict(lengths=jnp.array([8, 8], jnp.int64 if jax.config.x64_enabled else jnp.uint32)),
     "lengths dtype must be int32"),
    (dict(lengths=jnp.array([8, 8, 8], jnp.int32)), "lengths must have shape (2,), got (3,)"),
    (dict(impl="triton"), "impl must be one of ('auto', 'tpu', 'gpu', 'xla', 'reference'), got 'triton'"),
    (dict(q=(2, 4, 4, 64)), "to match q (2, 4, 4, 64) (a q shorter than k/v needs q_offsets)"),
    (dict(q=(2, 4, 4, 64), q_offsets=jnp.array([0.0, 4.0])), "q_offsets dtype must be int32, got float32"),
    (dict(q=(2, 4, 4, 64), q_offsets=jnp.array([4], jnp.int32)), "q_offsets must have shape (2,), got (1,)"),
    (dict(q_offsets=jnp.array([0, 4], jnp.int32), kv=(3, 8, 2, 64)),
     "k shape (3, 8, 2, 64) must be [batch=2, seq, kv_heads, head_dim=64]"),
]


@pytest.mark.parametrize("kwargs, message", FLASH_ERRORS, ids=[m[:40] for _, m in FLASH_ERRORS])
def test_flash_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        _flash(**kwargs)
    assert message in str(info.value)


PAGED_ERRORS = [
    (dict(q=(2, 1, 4, 64)), "q must have rank 3 [batch, heads, head_dim], got shape (2, 1, 4, 64)"),
    (dict(pages=(2, 6, 64)), "k_pages must have rank 4 [kv_heads, total_pages, page_size, head_dim]"),
    (dict(pages=(3, 6, 8, 64)), "heads (4) must be a multiple of kv_heads (3)"),
    (dict(pages=(2, 6, 8, 32)), "k_pages head_dim 32 must match q head_dim 64"),
    (dict(v_shape=(2, 5, 8, 64)), "k_pages shape (2, 6, 8, 64) and v_pages shape (2, 5, 8, 64)"),
    (dict(q=(2, 4, 512), pages=(2, 6, 8, 512)), "head_dim must be in [1, 256], got 512"),
    (dict(dtype=jnp.float16), "q dtype must be float32 or bfloat16, got float16"),
    (dict(k_dtype=BF16), "k_pages dtype bfloat16 must match q dtype float32"),
    (dict(lengths=jnp.array([3.0, 9.0])), "lengths dtype must be int32, got float32"),
    (dict(lengths=jnp.array([3], jnp.int32)), "lengths must have shape (2,), got (1,)"),
    (dict(table=jnp.zeros((2, 3), jnp.float32)), "page_indices dtype must be int32, got float32"),
    (dict(table=jnp.zeros((3, 3), jnp.int32)), "page_indices must have shape (2, 3), got (3, 3)"),
    (dict(table=jnp.zeros((2,), jnp.int32)), "page_indices must have rank 2 [batch, pages_per_sequence]"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(pages=(2, 6, 0, 64)), "need total_pages >= 1 and page_size >= 1, got (2, 6, 0, 64)"),
    (dict(pages=(2, 6, 0, 64), impl="xla"), "page_size >= 1"),  # was a ZeroDivisionError there
    (dict(pages=(2, 0, 8, 64)), "total_pages >= 1"),
]


@pytest.mark.parametrize("kwargs, message", PAGED_ERRORS, ids=[m[:40] for _, m in PAGED_ERRORS])
def test_paged_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        _paged(**kwargs)
    assert message in str(info.value)


def test_non_array_and_bad_scale_are_type_errors():
    with pytest.raises(TypeError, match="q must be an array, got list"):
        flash_attention([[1.0]], _arr((1, 1, 1, 8)), _arr((1, 1, 1, 8)))
    with pytest.raises(TypeError, match="sm_scale must be a Python number or None"):
        _flash(sm_scale=jnp.float32(0.1))
    with pytest.raises(TypeError, match="sm_scale must be a Python number or None, got bool"):
        _flash(sm_scale=True)
    for bad in (float("nan"), float("inf")):  # NaN made every output NaN
        with pytest.raises(ValueError, match="sm_scale must be finite"):
            _paged(sm_scale=bad)
    for bad in ("no", None, 1):  # "no" ran causal, None non-causal
        with pytest.raises(TypeError, match="causal must be True or False"):
            _flash(causal=bad)


def test_valid_inputs_pass_and_auto_resolves_on_cpu():
    assert _flash(dtype=BF16).dtype == BF16
    assert _paged().shape == (2, 4, 64)
    assert _flash(sm_scale=np.float32(0.125)).shape == (2, 8, 4, 64)
    assert resolve_impl("auto") == "reference"
    assert resolve_impl("tpu") == "tpu"
