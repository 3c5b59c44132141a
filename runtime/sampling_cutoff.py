"""Per-row logit cutoffs for min_p, top-k and top-p, found without sorting the vocabulary.

Each of the three filters keeps a row's most likely tokens, so together they keep every token
whose (temperature-scaled) logit is at least some cutoff. Sorting a [batch, vocab] array to find
it is slow on CPUs (64 x 128256 float32: about 1.9 s on 2 cores) and on TPUs; instead:

- min_p keeps exp(x - max) >= min_p: one pass finds the smallest such x (not max + log(min_p),
  which float32 rounds at max's scale: at temperature 1e-6 logits are ~1e7 and a step is ~1);
- top-k's cutoff is the k-th largest logit, and top-p's the smallest logit v such that the
  tokens at or below v hold more than 1 - top_p of the probability. Both are found by bisection
  over the logits' float32 bit patterns, mapped to int32 keys in the same order as the floats,
  so 32 halvings reach the exact value. Each halving is one pass over the row (a count, or a
  sum of probabilities).

As vLLM applies them: min_p first, then top-k, then top-p over the probabilities of what those
two kept. Tokens tied at a cutoff are all kept (a sort would keep the first of them), as vLLM's
threshold masks keep them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LOW_BITS = jnp.int32(0x7FFFFFFF)
_HALVINGS = 32  # int32 keys: the widest interval, 2**32, is down to one key after 32 halvings


def cutoff(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """f32[batch]: the smallest logit each row keeps (-inf where it filters nothing)."""
    top = jnp.max(scaled, axis=-1)
    above_min_p = jnp.exp(scaled - top[:, None]) >= min_p[:, None]
    cut = jnp.where(min_p > 0, jnp.min(jnp.where(above_min_p, scaled, jnp.inf), axis=-1), -jnp.inf)
    keys = _keys(scaled)
    cut = jax.lax.cond(jnp.any(top_k > 0), lambda: jnp.maximum(cut, _kth_largest(keys, top_k)), lambda: cut)
    return jax.lax.cond(jnp.any(top_p < 1), lambda: jnp.maximum(cut, _nucleus(scaled, keys, top, cut, top_p)),
                        lambda: cut)


def _kth_largest(keys: jax.Array, k: jax.Array) -> jax.Array:
    """f32[batch]: each row's k-th largest value (-inf where k is 0): the largest key with at least k
    keys at or above it."""
    k = jnp.minimum(k, keys.shape[-1])

    def halve(_, bounds):
        low, high = bounds  # at least k keys >= low; fewer than k >= high
        mid = _midpoint(low, high)
        enough = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

    low, _ = jax.lax.fori_loop(0, _HALVINGS, halve, (jnp.min(keys, axis=-1), jnp.max(keys, axis=-1) + 1))
    return jnp.where(k > 0, _values(low), -jnp.inf)


def _nucleus(scaled: jax.Array, keys: jax.Array, top: jax.Array, cut: jax.Array, top_p: jax.Array) -> jax.Array:
    """f32[batch]: the smallest key v such that the tokens kept so far (>= cut) at or below v hold
    more than 1 - top_p of their probability (-inf where top_p is 1). As vLLM's and transformers'
    top-p, the tail is summed, not the head: for top_p near 1 the head's float32 sum is off by more
    than the few tiny tokens the boundary decides. The top token always stays."""
    weights = jnp.where(scaled >= cut[:, None], jnp.exp(scaled - top[:, None]), 0.0)  # unnormalised probs
    tail = (1 - top_p) * jnp.sum(weights, axis=-1)

    def halve(_, bounds):
        low, high = bounds  # the mass at or below low is <= tail; at or below high it is > tail
        mid = _midpoint(low, high)
        over = jnp.sum(jnp.where(keys <= mid[:, None], weights, 0.0), axis=-1) > tail
        return jnp.where(over, low, mid), jnp.where(over, mid, high)

    _, high = jax.lax.fori_loop(0, _HALVINGS, halve, (jnp.min(keys, axis=-1) - 1, jnp.max(keys, axis=-1)))
    return jnp.where(top_p < 1, _values(high), -jnp.inf)


def _keys(x: jax.Array) -> jax.Array:
    """int32 keys in the same order as the float32 values (negative floats' magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ _LOW_BITS, bits)


def _values(keys: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ _LOW_BITS, keys), jnp.float32)


def _midpoint(low: jax.Array, high: jax.Array) -> jax.Array:
    # floor((low + high) / 2) without overflowing int32
    return (low >> 1) + (high >> 1) + (low & high & 1)
