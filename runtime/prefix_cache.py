"""Prefix caching on the device: the pool of cached prompt blocks, the lookups, and the prefill
of what follows a cached prefix. ModelRunner calls it around each prefill; which blocks are cached,
and in which pages, is runtime/prefix_index.py's.

The pool is a KV cache of its own (models/kv_cache.py: page 0 the sink, one page a block), laid
out and sharded like the serving cache, so the same insert writes it. A prefill after a hit
returns each row's whole prompt's K/V, exactly what a prefill of the whole prompt returns: the KV
handoff and the decode side do not know the difference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from splitserve.models import serving
from splitserve.models.kv_cache import SINK_PAGE, KVCacheSpec, allocate_cache
from splitserve.models.sharding import named_sharding
from splitserve.runtime.prefix_index import PrefixHit, PrefixIndex
from splitserve.runtime.sampling import sample

CACHE_AXES = ("kv_heads", "pages", "page_slot", "head_dim")


def first_tokens_after_prefix(graphdef, params, x, lengths, prompt_tokens, prompt_lengths, sampling, bias, masks):
    # The last new token's logits, sampled; the repetition penalty sees the whole prompt, prefix included.
    logits = serving.prefill_logits(graphdef, params, x, lengths)
    return sample(logits, sampling, prompt=(prompt_tokens, prompt_lengths), bias=bias, masks=masks)


class PrefixCache:
    def __init__(self, model, cache_spec: KVCacheSpec, pages: int, layer_graphdef, insert, attention_impl: str):
        """`insert`: the runner's jitted insert_prefill (the pool is donated to it); `attention_impl`: the
        runner's, so a hit's attention runs the kernels a whole prefill runs."""
        self.index = PrefixIndex(pages, cache_spec.page_size)
        self.page_size = cache_spec.page_size
        spec = dataclasses.replace(cache_spec, num_pages=pages)
        self.pool = allocate_cache(spec, named_sharding(CACHE_AXES, spec.page_shape, model.mesh))
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up, and found
        self._layer = jax.jit(functools.partial(serving.prefill_layer_after_prefix, layer_graphdef, attention_impl,
                                                model.mesh), static_argnums=0)
        self._first_tokens = jax.jit(functools.partial(first_tokens_after_prefix, model.graphdef))
        self._insert = insert

    def hits(self, prompts, sampling) -> list[PrefixHit] | None:
        """Each row's cached prefix, or None when no row has one. A row that asks for prompt
        logprobs is not looked up: those need every prompt token's logits."""
        hits = []
        for prompt, params in zip(prompts, sampling):
            if params.prompt_logprobs is not None:
                hits.append(PrefixHit((), 0))
                continue
            hits.append(self.index.lookup(prompt))
            self.queried_tokens += len(prompt)
            self.hit_tokens += hits[-1].tokens
        return hits if any(hit.tokens for hit in hits) else None

    def block_table(self, hits: list[PrefixHit], batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(i32[batch, pages of width] the rows' cached pages, sink-padded; i32[batch] their tokens).
        The table spans the whole width whatever the hits: one program per (batch, seq, width)."""
        table = np.full((batch, -(-width // self.page_size)), SINK_PAGE, np.int32)
        prefix_lengths = np.zeros((batch,), np.int32)
        for row, hit in enumerate(hits):
            table[row, : len(hit.pages)] = hit.pages
            prefix_lengths[row] = hit.tokens
        return table, prefix_lengths

    def layers(self, width: int, layer_params: list, x, lengths, table, prefix_lengths):
        """Every decoder layer over the new tokens: (x, each layer's whole-prompt K, V)."""
        ks, vs = [], []
        for params, pool_k, pool_v in zip(layer_params, self.pool.k, self.pool.v):
            x, k, v = self._layer(width, params, x, lengths, pool_k, pool_v, table, prefix_lengths)
            ks.append(k)
            vs.append(v)
        return x, tuple(ks), tuple(vs)

    def first_tokens(self, params, x, lengths, prompt_tokens, prompt_lengths, arrays, bias, masks):
        return self._first_tokens(params, x, lengths, prompt_tokens, prompt_lengths, arrays, bias, masks)

    def store(self, prompts, ks, vs) -> None:
        """Copies the whole blocks of these prompts that are not cached yet into the pool."""
        batch, width = ks[0].shape[:2]
        table = np.full((batch, -(-width // self.page_size)), SINK_PAGE, np.int32)
        lengths = np.zeros((batch,), np.int32)
        written: set[int] = set()  # pages this write fills: no row's store may evict them
        try:
            for row, prompt in enumerate(prompts):
                new = self.index.store(prompt, written)
                if new is not None:
                    end = new.first_block + len(new.pages)
                    table[row, new.first_block:end] = new.pages
                    lengths[row] = end * self.page_size  # earlier blocks were cached: their slots go to the sink
        finally:  # the rows the index took before any failure must hold their tokens' K/V (it undoes the failed row)
            if written:
                self.pool = self._insert(self.pool, ks, vs, table, lengths)
