"""The paged KV cache as a pytree, and the pure functions that write into it.

Per layer, K and V are `[kv_heads, num_pages, page_size, head_dim]` (the kernels' layout).
Page 0 is never handed to a request: it is the sink where padded batch rows and padded
prompt positions write, so writes never need a branch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

SINK_PAGE = 0


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    num_pages: int  # including the sink page
    page_size: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the sink), got {self.num_pages}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_kv_heads, self.num_pages, self.page_size, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        itemsize = jnp.dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.page_size * self.head_dim * itemsize


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [kv_heads, num_pages, page_size, head_dim]
    v: tuple[jax.Array, ...]


def allocate_cache(spec: KVCacheSpec, sharding=None) -> KVCache:
    def zeros():
        return jnp.zeros(spec.page_shape, spec.dtype, device=sharding)

    return KVCache(tuple(zeros() for _ in range(spec.num_layers)), tuple(zeros() for _ in range(spec.num_layers)))


def slot_addresses(page_table: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int):
    """Pages and in-page slots of token positions; invalid positions go to the sink page.

    page_table: i32[batch, pages_per_seq]; positions, valid: [batch, ...] -> (pages, slots)
    """
    # A position past the table goes to the sink too: clipped to the last column it would
    # overwrite a real token of the row.
    valid = valid & (positions < page_table.shape[1] * page_size)
    page_col = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    pages = jnp.take_along_axis(page_table, page_col.reshape(page_table.shape[0], -1), axis=1)
    pages = jnp.where(valid, pages.reshape(positions.shape), SINK_PAGE)
    slots = jnp.where(valid, positions % page_size, 0)
    return pages, slots


def write_tokens(pages_kpsh: jax.Array, new_bkh: jax.Array, pages_b, slots_b) -> jax.Array:
    """Writes one token per row: new [n, kv_heads, head_dim] at (pages[n], slots[n])."""
    return pages_kpsh.at[:, pages_b, slots_b].set(jnp.swapaxes(new_bkh, 0, 1).astype(pages_kpsh.dtype))


def insert_prefill(
    cache: KVCache,
    k_layers: tuple[jax.Array, ...],  # per layer [batch, seq, kv_heads, head_dim]
    v_layers: tuple[jax.Array, ...],
    page_table: jax.Array,  # i32[batch, pages_per_seq]
    lengths: jax.Array,  # i32[batch]
) -> KVCache:
    batch, seq = k_layers[0].shape[:2]
    positions = jnp.broadcast_to(jnp.arange(seq)[None, :], (batch, seq))
    valid = positions < lengths[:, None]
    pages, slots = slot_addresses(page_table, positions, valid, cache.k[0].shape[2])
    pages, slots = pages.reshape(-1), slots.reshape(-1)

    def flat(x):
        return x.reshape(batch * seq, *x.shape[2:])

    new_k = tuple(write_tokens(c, flat(k), pages, slots) for c, k in zip(cache.k, k_layers))
    new_v = tuple(write_tokens(c, flat(v), pages, slots) for c, v in zip(cache.v, v_layers))
    return KVCache(new_k, new_v)
