"""Input checks for the public attention entry points.

Every check raises ValueError (TypeError for a non-array argument) naming the
argument, the rule, and the value seen, so a bad call fails before tracing a kernel.
Checks use only static facts (shapes, dtypes, Python values); they never look at
array contents, so they are safe under jit.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp

IMPLS = ("auto", "tpu", "gpu", "xla", "reference")
MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _shape_dtype(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape), jnp.dtype(x.dtype)


def _check_rank(name, shape, rank, layout):
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {shape}")


def _check_float(name, dtype, want=None):
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be float32 or bfloat16, got {dtype}")
    if want is not None and dtype != want:
        raise ValueError(f"{name} dtype {dtype} must match q dtype {want}")


def _check_heads(heads, kv_heads, head_dim):
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def _check_int32(name, x, shape):
    got_shape, dtype = _shape_dtype(name, x)
    if dtype != jnp.dtype(jnp.int32):
        raise ValueError(f"{name} dtype must be int32, got {dtype}")
    if got_shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {got_shape}")


def _check_sm_scale(sm_scale):
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a Python number or None, got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale}")


def check_flash_args(q, k, v, lengths, sm_scale, impl, causal=True, q_offsets=None) -> None:
    """q: [batch, q_seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; lengths, q_offsets:
    i32[batch]. Without q_offsets the queries are the keys' positions, so q_seq must equal seq."""
    check_impl(impl)
    if not isinstance(causal, bool):  # "no" would run causal, None non-causal
        raise TypeError(f"causal must be True or False, got {causal!r}")
    layout = "[batch, seq, heads, head_dim]"
    q_shape, q_dtype = _shape_dtype("q", q)
    _check_rank("q", q_shape, 4, layout)
    _check_float("q", q_dtype)
    batch, q_seq, heads, head_dim = q_shape
    kv_layout = "[batch, seq, kv_heads, head_dim]"
    for name, x in (("k", k), ("v", v)):
        shape, dtype = _shape_dtype(name, x)
        _check_rank(name, shape, 4, kv_layout)
        _check_float(name, dtype, q_dtype)
        if q_offsets is None and (shape[0], shape[1], shape[3]) != (batch, q_seq, head_dim):
            raise ValueError(
                f"{name} shape {shape} must be [batch={batch}, seq={q_seq}, kv_heads, "
                f"head_dim={head_dim}] to match q {q_shape} (a q shorter than k/v needs q_offsets)"
            )
        if (shape[0], shape[3]) != (batch, head_dim):
            raise ValueError(
                f"{name} shape {shape} must be [batch={batch}, seq, kv_heads, "
                f"head_dim={head_dim}] to match q {q_shape}"
            )
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k shape {tuple(k.shape)} and v shape {tuple(v.shape)} must be equal")
    _check_heads(heads, k.shape[2], head_dim)
    if q_seq < 1 or k.shape[1] < 1:
        raise ValueError(f"q and k/v need at least 1 position, got q {q_shape} and k/v {tuple(k.shape)}")
    if lengths is not None:
        _check_int32("lengths", lengths, (batch,))
    if q_offsets is not None:
        _check_int32("q_offsets", q_offsets, (batch,))
    _check_sm_scale(sm_scale)


def check_paged_args(q, k_pages, v_pages, lengths, page_indices, sm_scale, impl) -> None:
    """q: [batch, heads, head_dim]; k/v_pages: [kv_heads, total_pages, page_size, head_dim]."""
    check_impl(impl)
    q_shape, q_dtype = _shape_dtype("q", q)
    _check_rank("q", q_shape, 3, "[batch, heads, head_dim]")
    _check_float("q", q_dtype)
    batch, heads, head_dim = q_shape
    layout = "[kv_heads, total_pages, page_size, head_dim]"
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        shape, dtype = _shape_dtype(name, x)
        _check_rank(name, shape, 4, layout)
        _check_float(name, dtype, q_dtype)
        if shape[3] != head_dim:
            raise ValueError(f"{name} head_dim {shape[3]} must match q head_dim {head_dim}")
    if tuple(k_pages.shape) != tuple(v_pages.shape):
        raise ValueError(
            f"k_pages shape {tuple(k_pages.shape)} and v_pages shape "
            f"{tuple(v_pages.shape)} must be equal"
        )
    _check_heads(heads, k_pages.shape[0], head_dim)
    if k_pages.shape[1] < 1 or k_pages.shape[2] < 1:
        raise ValueError(f"k_pages/v_pages {layout} need total_pages >= 1 and page_size >= 1, "
                         f"got {tuple(k_pages.shape)}")
    pi_shape, _ = _shape_dtype("page_indices", page_indices)
    _check_rank("page_indices", pi_shape, 2, "[batch, pages_per_sequence]")
    _check_int32("page_indices", page_indices, (batch, pi_shape[1]))
    if pi_shape[1] < 1:
        raise ValueError("page_indices must have at least one page per sequence")
    _check_int32("lengths", lengths, (batch,))
    _check_sm_scale(sm_scale)
