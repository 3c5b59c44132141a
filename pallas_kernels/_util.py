"""Small shared helpers for the kernel wrappers (padding, rounding, interpret mode)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked scores: exp(MASK - m) underflows to 0 and
# MASK - MASK stays finite, unlike -inf - -inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def traced_in_32_bits(kernel):
    """Traces `kernel` with jax_enable_x64 off. The kernels index with int32 (what Mosaic and
    Triton take); under x64 a Python int in their index maths became int64 and tracing failed
    ("lax.div requires arguments to have the same dtypes"). Their inputs are 32-bit or narrower
    (checked), so nothing else changes."""

    @functools.wraps(kernel)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(False):
            return kernel(*args, **kwargs)

    return wrapper


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `x` along `axis` up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def default_scale(head_dim: int, sm_scale: float | None) -> float:
    return float(head_dim) ** -0.5 if sm_scale is None else float(sm_scale)


def dot_precision(dtype):
    """Full f32 products for f32 tiles (TPU and GPU defaults may use bf16/TF32 passes)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def interpret_arg(interpret):
    """Normalises `interpret` for pl.pallas_call: None/False -> compile, else as given."""
    return False if interpret is None else interpret
