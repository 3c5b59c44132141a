"""The token bitmask rows of structured outputs on the device (runtime/grammar_masks.py makes them).

Two arrays, as for the logit bias: one row per decoding request that has a penalty row
(runtime/penalty_rows.py), and one per row of a prefill batch. A step writes the rows of its
constrained requests in one call, padded to the array's rows so that it compiles once; the
sampler reads them through SamplingArrays.grammar_row (runtime/sampling.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def _set_rows(mesh, masks, rows, values):
    # Rows past the array (padding) are dropped; the layout stays replicated, as warm-up compiled it.
    return jax.lax.with_sharding_constraint(masks.at[rows].set(values, mode="drop"),
                                            NamedSharding(mesh, PartitionSpec()))


class DeviceMasks:
    def __init__(self, mesh, decode_rows: int, prefill_rows: int, words: int):
        replicated = NamedSharding(mesh, PartitionSpec())
        self.decode = jax.device_put(jnp.full((decode_rows, words), -1, jnp.int32), replicated)
        self.prefill = jax.device_put(jnp.full((prefill_rows, words), -1, jnp.int32), replicated)
        self.set_rows = jax.jit(functools.partial(_set_rows, mesh), donate_argnums=0)

    def write_decode(self, rows: list[int] | None, masks: list[np.ndarray | None]) -> None:
        """Each constrained request's mask into its row (`rows`: PenaltyRows' answer for the step)."""
        if rows is not None and any(m is not None for m in masks):
            self.decode = self._written(self.decode, [(row, m) for row, m in zip(rows, masks) if m is not None])

    def write_prefill(self, masks: list[np.ndarray | None]) -> None:
        """Each constrained prompt's first-token mask into the row of its place in the batch."""
        if any(m is not None for m in masks):
            if len(masks) > self.prefill.shape[0]:
                raise ValueError(f"a prefill batch with structured outputs holds at most {self.prefill.shape[0]}")
            self.prefill = self._written(self.prefill, [(row, m) for row, m in enumerate(masks) if m is not None])

    def _written(self, array, row_masks: list[tuple[int, np.ndarray]]):
        capacity, words = array.shape
        rows = np.full(capacity, capacity, np.int32)  # out of range: dropped
        values = np.zeros((capacity, words), np.int32)
        for i, (row, mask) in enumerate(row_masks):
            rows[i], values[i] = row, mask
        return self.set_rows(array, rows, values)
