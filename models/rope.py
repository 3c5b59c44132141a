"""Rotary position embeddings (HF "rotate_half" convention) with linear and llama3 scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from splitserve.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:  # f32[head_dim // 2]
    # float32 like transformers: angles at position ~1e3 differ visibly otherwise.
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        scaled = np.where(
            wavelen > low_wavelen,
            inv_freq / rope.factor,
            np.where(wavelen < high_wavelen, inv_freq, blended),
        )
        return scaled.astype(np.float32)
    return inv_freq


def apply_rope(
    x: jax.Array,  # [batch, seq, heads, head_dim]
    positions: jax.Array,  # i32[batch, seq]
    inv_freq: np.ndarray,  # [head_dim // 2]
) -> jax.Array:
    # Angles in f32 like transformers, so long positions keep their precision.
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
