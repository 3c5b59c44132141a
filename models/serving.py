"""Pure serving functions of the decoder: prefill and decode step.

    prefill(params, tokens, lengths)            -> last logits, K/V of every layer
    decode_step(params, cache, tokens, positions, page_table) -> logits, cache (updated)

`params` is the nnx.State of a Decoder; `graphdef` is static and closed over by the
caller's jit. The cache is an argument and a result so callers can donate it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import Mesh

from splitserve.models.attention import attention_after_prefix, decode_attention, prefill_attention
from splitserve.models.kv_cache import KVCache, slot_addresses, write_tokens


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,  # i32[batch, seq], padded past `lengths`
    lengths: jax.Array,  # i32[batch]
    attention_impl: str = "auto",
    mesh: Mesh | None = None,
):
    """Returns (f32[batch, vocab] logits of each row's last token, k tuple, v tuple).

    The composition of the three stages below; a runner that wants each layer's K/V as soon
    as that layer is done jits the stages separately instead (runtime/model_runner.py).
    """
    layer_graphdef, layer_params = split_layers(graphdef, params)
    x = prefill_embed(graphdef, params, tokens)
    ks, vs = [], []
    for one_layer in layer_params:
        x, k, v = prefill_layer(layer_graphdef, attention_impl, mesh, one_layer, x, lengths)
        ks.append(k)
        vs.append(v)
    return prefill_logits(graphdef, params, x, lengths), tuple(ks), tuple(vs)


def split_layers(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, list[nnx.State]]:
    """(the graphdef every decoder layer shares, each layer's params): one compiled layer serves all."""
    model = nnx.merge(graphdef, params)
    split = [nnx.split(layer) for layer in model.layers]
    layer_graphdef = split[0][0]
    if any(g != layer_graphdef for g, _ in split):
        raise ValueError("decoder layers differ in structure; they cannot share one compiled layer")
    return layer_graphdef, [state for _, state in split]


def prefill_embed(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    """i32[batch, seq] -> [batch, seq, hidden]."""
    return nnx.merge(graphdef, params).embed_tokens(tokens)


def prefill_layer(layer_graphdef: nnx.GraphDef, attention_impl: str, mesh: Mesh | None, layer_params: nnx.State,
                  x_btd: jax.Array, lengths: jax.Array):
    """One decoder layer over the prompt: (x [batch, seq, hidden], k, v [batch, seq, kv_heads, head_dim])."""
    layer = nnx.merge(layer_graphdef, layer_params)
    batch, seq = x_btd.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
    kv = []

    def attend(q, k, v):
        kv.extend((k, v))
        return prefill_attention(q, k, v, lengths, impl=attention_impl, mesh=mesh)

    x_btd = layer(x_btd, positions, attend)
    return x_btd, kv[0], kv[1]


def prefill_layer_after_prefix(layer_graphdef: nnx.GraphDef, attention_impl: str, mesh: Mesh | None, width: int,
                               layer_params: nnx.State, x_btd: jax.Array, lengths: jax.Array, pool_k: jax.Array,
                               pool_v: jax.Array, block_table: jax.Array, prefix_lengths: jax.Array):
    """One decoder layer over the tokens that follow each row's cached prefix (prefix caching).

    x [batch, seq, hidden] holds the new tokens, `lengths` of them per row; the prefix's K/V are
    this layer's pages of the prefix pool [kv_heads, pages, block, head_dim] listed in
    block_table i32[batch, blocks], `prefix_lengths` tokens per row (0: no prefix). Returns (x,
    k, v) with k/v [batch, width, kv_heads, head_dim] the whole prompt's (prefix, then new), as a
    full prefill of the prompt returns them.
    """
    return prefill_layer_after_kv(layer_graphdef, attention_impl, mesh, width, layer_params, x_btd, lengths,
                                  gather_prefix(pool_k, block_table), gather_prefix(pool_v, block_table),
                                  prefix_lengths)


def prefill_layer_after_kv(layer_graphdef: nnx.GraphDef, attention_impl: str, mesh: Mesh | None, width: int,
                           layer_params: nnx.State, x_btd: jax.Array, lengths: jax.Array, prefix_k: jax.Array | None,
                           prefix_v: jax.Array | None, prefix_lengths: jax.Array):
    """As prefill_layer_after_prefix, with the prefix's K/V given as arrays [batch, >= prefix, kv_heads,
    head_dim] (chunked prefill: the K/V the earlier chunks returned). None: no prefix (prefix_lengths 0)."""
    layer = nnx.merge(layer_graphdef, layer_params)
    seq = x_btd.shape[1]
    positions = prefix_lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    kv = []

    def attend(q, k, v):
        # With no prefix every position comes from the new tokens, so they stand in as the prefix.
        k = merge_prefix(k if prefix_k is None else prefix_k, k, prefix_lengths, width)
        v = merge_prefix(v if prefix_v is None else prefix_v, v, prefix_lengths, width)
        kv.extend((k, v))
        return attention_after_prefix(q, k, v, prefix_lengths, prefix_lengths + lengths, impl=attention_impl, mesh=mesh)

    x_btd = layer(x_btd, positions, attend)
    return x_btd, kv[0], kv[1]


def gather_prefix(pool: jax.Array, block_table: jax.Array) -> jax.Array:
    """pool [kv_heads, pages, block, head_dim], block_table i32[batch, blocks] -> [batch, blocks * block, kv_heads, head_dim]."""
    g = pool[:, block_table]  # [kv_heads, batch, blocks, block, head_dim]
    kv_heads, batch, blocks, block, head_dim = g.shape
    return jnp.transpose(g, (1, 2, 3, 0, 4)).reshape(batch, blocks * block, kv_heads, head_dim)


def merge_prefix(prefix: jax.Array, new: jax.Array, prefix_lengths: jax.Array, width: int) -> jax.Array:
    """Each row's prompt from position 0: prefix [b, p, ...] below prefix_lengths[r], new [b, s, ...] after."""
    batch = prefix.shape[0]
    pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (batch, width))
    from_prefix = pos < prefix_lengths[:, None]
    prefix_idx = jnp.minimum(pos, prefix.shape[1] - 1)
    new_idx = jnp.clip(pos - prefix_lengths[:, None], 0, new.shape[1] - 1)

    def take(x, idx):
        return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)

    return jnp.where(from_prefix[:, :, None, None], take(prefix, prefix_idx), take(new, new_idx))


def prefill_logits(graphdef: nnx.GraphDef, params: nnx.State, x_btd: jax.Array, lengths: jax.Array) -> jax.Array:
    """f32[batch, vocab] logits of each row's last prompt token."""
    model = nnx.merge(graphdef, params)
    last = x_btd[jnp.arange(x_btd.shape[0]), jnp.maximum(lengths - 1, 0)]
    return model.logits(model.final_norm(last))


def decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    tokens: jax.Array,  # i32[batch], the newest token of each row
    positions: jax.Array,  # i32[batch], its position (= tokens already in the cache)
    page_table: jax.Array,  # i32[batch, pages_per_seq]; padded rows point at the sink page
    active: jax.Array,  # bool[batch], False for padded rows
    attention_impl: str = "auto",
    mesh: Mesh | None = None,
):
    """Writes each row's new K/V into its pages, attends over the cache, returns (logits, cache)."""
    model = nnx.merge(graphdef, params)
    page_size = cache.k[0].shape[2]
    pages, slots = slot_addresses(page_table, positions, active, page_size)
    lengths = jnp.where(active, positions + 1, 1)
    new_k, new_v = list(cache.k), list(cache.v)

    def attend(layer, q, k, v):  # q [b,1,n,h], k/v [b,1,kv,h]
        new_k[layer] = write_tokens(new_k[layer], k[:, 0], pages, slots)
        new_v[layer] = write_tokens(new_v[layer], v[:, 0], pages, slots)
        out = decode_attention(q[:, 0], new_k[layer], new_v[layer], lengths, page_table,
                               impl=attention_impl, mesh=mesh)
        return out[:, None]

    hidden = model.hidden_states(tokens[:, None], positions[:, None], attend)
    return model.logits(hidden[:, 0]), KVCache(tuple(new_k), tuple(new_v))
