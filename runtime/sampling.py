"""On-device sampling of the next token from the logits.

Per-request randomness comes from `fold_in(key(seed), step)`, where step is the index of
the token being generated: the same seed gives the same tokens whatever else is in the
batch and whether the token is sampled by prefill or by decode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from splitserve.runtime.sampling_params import SamplingParams  # host-side, validated (no JAX)


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling state for one device step (host numpy, padded to the batch bucket)."""

    temperature: np.ndarray  # f32[batch]
    top_k: np.ndarray  # i32[batch]
    top_p: np.ndarray  # f32[batch]
    seed: np.ndarray  # u32[batch]
    step: np.ndarray  # i32[batch], index of the token being sampled

    @classmethod
    def build(cls, params: list[SamplingParams], steps: list[int], batch: int) -> "SamplingArrays":
        pad = batch - len(params)
        return cls(
            temperature=np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
            top_k=np.array([p.top_k for p in params] + [0] * pad, np.int32),
            top_p=np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
            seed=np.array([p.seed or 0 for p in params] + [0] * pad, np.uint32),
            step=np.array(list(steps) + [0] * pad, np.int32),
        )


jax.tree_util.register_dataclass(
    SamplingArrays, data_fields=["temperature", "top_k", "top_p", "seed", "step"], meta_fields=[]
)


def _sample_filtered(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = (s.top_k[:, None] == 0) | (rank < s.top_k[:, None])
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < s.top_p[:, None]) | (rank == 0)  # the top token always stays
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(seed, step, row):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(s.seed, s.step, sorted_logits)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """f32[batch, vocab] -> i32[batch]. Temperature 0 rows are greedy (argmax)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: _sample_filtered(logits, s).astype(jnp.int32),
        lambda: greedy,  # skip the vocabulary sort when the whole batch is greedy
    )
    return jnp.where(s.temperature > 0, sampled, greedy)
