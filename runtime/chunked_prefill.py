"""Chunked prefill: a long prompt's prefill in pieces, so other work gets the device in between.

Once dispatched, a prefill runs to its end. On a colocated worker every running request's next
token waits for all of it; on a prefill worker, so do the short prompts queued behind it. Cut
into chunks of `chunk_tokens`, a long prompt gives the device back after each chunk, and the
prefill engine (runtime/prefill_engine.py) runs other work in between.

Each chunk is a prefill after a prefix (models/serving.py, prefill_layer_after_kv): its queries
attend over the earlier chunks' K/V and their own, and every layer returns the whole prompt's
K/V so far, at the prompt's padded width. After the last chunk the first token and the K/V are
what a prefill of the whole prompt gives (to rounding): the handoff and decode cannot tell.

The remainder goes first and every later chunk is exactly `chunk_tokens` long, so the later
chunks' programs are one per prompt width (warmed up); the first chunk's compile on first use.
A prompt with cached blocks (prefix caching) starts its first chunk after them.
"""

from __future__ import annotations

import functools
from typing import Generator

import jax
import numpy as np

from splitserve.models import serving
from splitserve.runtime.buckets import padded_rows
from splitserve.runtime.prefix_cache import first_tokens_after_prefix
from splitserve.runtime.sampling import Sampled
from splitserve.runtime.sampling_params import SamplingParams

# (the first token as a Sampled, each layer's K, each layer's V (device arrays [1, width, kv_heads,
# head_dim]), prompt tokens found in the prefix cache)
ChunkedResult = tuple[Sampled, tuple, tuple, int]


class ChunkedPrefill:
    def __init__(self, runner, layer_graphdef, chunk_tokens: int):
        """`runner`: the ModelRunner whose params, buckets, sampling rows and prefix cache the chunks use."""
        if chunk_tokens < 1:
            raise ValueError(f"prefill chunks must hold at least 1 token, got {chunk_tokens}")
        self.runner = runner
        self.chunk_tokens = chunk_tokens
        model = runner.model
        self.layer = jax.jit(functools.partial(serving.prefill_layer_after_kv, layer_graphdef,
                                               runner.config.attention_impl, model.mesh), static_argnums=0)
        self.first_tokens = jax.jit(functools.partial(first_tokens_after_prefix, model.graphdef))

    def wants(self, prompt: list[int], params: SamplingParams) -> bool:
        """Whether this prompt is prefilled in chunks. Prompt logprobs need every prompt token's
        logits at once, so a request asking for them is prefilled whole."""
        return len(prompt) > self.chunk_tokens and params.prompt_logprobs is None

    def chunks(self, prompt_tokens: int, cached_tokens: int) -> list[int]:
        """Token counts of the chunks, in order: the remainder, then full chunks."""
        left = prompt_tokens - cached_tokens
        full, remainder = divmod(left, self.chunk_tokens)
        return ([remainder] if remainder else []) + [self.chunk_tokens] * full

    def run(self, prompt: list[int], params: SamplingParams, step: int) -> Generator[None, None, ChunkedResult]:
        """Prefills one prompt, yielding after each chunk but the last once the device has finished
        it; returns without waiting for the last (its K/V and first token are dispatched)."""
        runner = self.runner
        cache = runner.prefix_cache
        hits = cache.hits([prompt], [params]) if cache is not None else None
        done = hits[0].tokens if hits is not None else 0
        width = runner.padded_prompt_len(len(prompt))
        ks = vs = None
        sizes = self.chunks(len(prompt), done)
        for index, size in enumerate(sizes):
            tokens, lengths = padded_rows([prompt[done: done + size]], 1, runner.padded_prompt_len(size))
            x = runner.embed(runner.model.params, tokens)
            if index == 0 and hits is not None:
                table, prefix_lengths = cache.block_table(hits, 1, width)
                x, ks, vs = cache.layers(width, runner.layer_params, x, lengths, table, prefix_lengths)
            else:
                x, ks, vs = self._layers(width, x, lengths, ks, vs, np.array([done], np.int32))
            done += size
            if index < len(sizes) - 1:
                jax.block_until_ready(x)
                yield
        prompt_tokens, prompt_lengths = padded_rows([prompt], 1, width)
        # Written now, not at the start: another batch may have used the prefill's sampling rows in between.
        arrays = runner.sampling_arrays([params], [step], 1)
        first = self.first_tokens(runner.model.params, x, lengths, prompt_tokens, prompt_lengths, arrays,
                                  runner.prefill_bias, runner.masks.prefill)
        if cache is not None:
            cache.store([prompt], ks, vs)
        return first, ks, vs, hits[0].tokens if hits is not None else 0

    def _layers(self, width, x, lengths, ks, vs, prefix_lengths):
        new_ks, new_vs = [], []
        for layer, layer_params in enumerate(self.runner.layer_params):
            x, k, v = self.layer(width, layer_params, x, lengths, None if ks is None else ks[layer],
                                 None if vs is None else vs[layer], prefix_lengths)
            new_ks.append(k)
            new_vs.append(v)
        return x, tuple(new_ks), tuple(new_vs)
