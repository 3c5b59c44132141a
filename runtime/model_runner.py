"""Owns the device side of one engine: params, KV cache, and the jitted step functions.

The contract with the rest of the runtime is arrays in, arrays out:
    prefill(prompts, sampling)            -> first tokens (host), K/V per layer (device)
    insert(k, v, page_tables, lengths)    -> writes prompt K/V into pages
    decode(tokens, positions, page_tables, sampling) -> next tokens (host)
Inputs are padded to bucketed shapes; the cache is donated so updates happen in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from splitserve.models import serving
from splitserve.models.attention import model_attention_impl
from splitserve.models.kv_cache import SINK_PAGE, KVCacheSpec, allocate_cache, insert_prefill
from splitserve.models.loader import LoadedModel
from splitserve.models.sharding import named_sharding
from splitserve.runtime.buckets import all_buckets, bucket, padded_rows
from splitserve.runtime.chunked_prefill import ChunkedPrefill
from splitserve.runtime.grammar_masks import GrammarMasks
from splitserve.runtime.host_kv import PrefilledRow
from splitserve.runtime.host_staging import StagingPool
from splitserve.runtime.kv_wire import expand_to_serving_heads
from splitserve.runtime.mask_rows import DeviceMasks
from splitserve.runtime.penalty_rows import PenaltyRows
from splitserve.runtime.prefix_cache import PrefixCache
from splitserve.runtime.prompt_logprobs import prompt_logprobs
from splitserve.runtime.sampling import IN_PROMPT, Sampled, SamplingArrays, bias_vector, sample

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    page_size: int = 16
    num_pages: int = 1024  # including the sink page
    max_batch: int = 16
    max_prefill_batch: int = 8
    # False on a prefill-only worker: no decode step, so its per-request vocabulary rows (penalty
    # counts, logit biases: 2 x max_batch x vocab x 4 bytes) shrink to one row each.
    decodes: bool = True
    min_prefill_bucket: int = 16
    # Small requests share one decode shape: fewer compilations, all done at warm-up.
    min_decode_batch: int = 8
    min_page_table_width: int = 8
    attention_impl: str = "auto"
    # Page-table widths at 1.5x steps as well as powers of two. The plain-JAX reference attention
    # reads every page of the table, so padding costs time there; the kernels and the CPU's "xla"
    # attention stop at each row's (or the longest row's) length. None: fine exactly when the
    # model's attention is the reference.
    fine_page_table_widths: bool | None = None
    # Prompt lengths at 1.5x steps as well as powers of two (96 is a bucket, not 128). None: fine
    # exactly when attention is plain JAX ("xla" or "reference", as on a CPU): there prefill is
    # compute-bound and its time follows the padded tokens (8 prompts of 96 tokens on a 2-core
    # CPU: 234 ms at 96, 325 at 128); the Pallas kernels keep power-of-two tiles.
    fine_prompt_buckets: bool | None = None
    # Prefix caching: pages (of page_size tokens, including a sink page) of a device pool that keeps
    # the KV of recent prompts' whole blocks, so a prompt that starts like an earlier one computes
    # only what follows (runtime/prefix_cache.py). 0: off.
    prefix_cache_pages: int = 0
    # Chunked prefill: prompts longer than this many tokens are prefilled in chunks of it, giving the
    # device to other work in between (runtime/chunked_prefill.py). 0: off.
    prefill_chunk_tokens: int = 0


def _logits_and_sample(graphdef, params, x, tokens, lengths, sampling, bias, masks):
    return sample(serving.prefill_logits(graphdef, params, x, lengths), sampling, prompt=(tokens, lengths), bias=bias,
                  masks=masks)


def _decode_and_sample(graphdef, impl, mesh, params, cache, counts, bias, masks, tokens, positions, page_table, active,
                       sampling):
    # Each input token is its request's newest generated one: counted for the penalties before
    # they apply (rows without a penalty row are dropped), a handful of scalar adds in place.
    counts = counts.at[sampling.penalty_row, tokens].add(1, mode="drop")
    logits, cache = serving.decode_step(graphdef, params, cache, tokens, positions, page_table, active, impl, mesh)
    return sample(logits, sampling, counts, bias=bias, masks=masks), cache, _replicated(counts, mesh)


def _zero_rows(mesh, counts, bias, rows):
    return _replicated(counts.at[rows].set(0, mode="drop"), mesh), _replicated(bias.at[rows].set(0, mode="drop"), mesh)


def _set_bias_row(mesh, bias, row, values):
    return _replicated(bias.at[row].set(values), mesh)


def _set_prompt_row(mesh, counts, row, in_prompt):
    # A repetition-penalised request's fresh row: nothing generated yet, IN_PROMPT at its prompt ids.
    return _replicated(counts.at[row].set(jnp.where(in_prompt, IN_PROMPT, 0)), mesh)


def _replicated(x, mesh):
    # The counts keep one layout from step to step: a layout the compiler picked for an output
    # would not match the one the warm-up compiled for, and the next step would compile again.
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


class ModelRunner:
    def __init__(self, model: LoadedModel, config: RunnerConfig):
        self.model = model
        self.config = config
        cfg = model.config
        self.max_model_len = cfg.max_model_len
        self.max_pages_per_seq = -(-cfg.max_model_len // config.page_size)
        self.cache_spec = KVCacheSpec(
            num_layers=cfg.num_layers, num_kv_heads=model.layout.num_kv_heads, num_pages=config.num_pages,
            page_size=config.page_size, head_dim=cfg.head_dim, dtype=jnp.dtype(model.dtype).name,
        )
        cache_axes = ("kv_heads", "pages", "page_slot", "head_dim")
        self.cache = allocate_cache(self.cache_spec, named_sharding(cache_axes, self.cache_spec.page_shape, model.mesh))
        # Receive buffers for transferred KV: up to two longest prompts' worth kept for reuse.
        bytes_per_token = self.cache_spec.bytes_per_page // config.page_size
        self.staging = StagingPool(max_free_bytes=2 * cfg.max_model_len * bytes_per_token)
        # Generated-token counts (and prompt flags) of the requests with penalties (one row each).
        rows = config.max_batch if config.decodes else 1
        self.penalty_rows = PenaltyRows(rows)
        replicated = NamedSharding(model.mesh, PartitionSpec())
        self.penalty_counts = jax.device_put(jnp.zeros((rows, cfg.vocab_size), jnp.int32), replicated)
        # The logit bias rows (logit_bias, allowed_token_ids) of decoding requests, on the same rows as
        # their counts; and one row per prefill batch row, written before a prefill that needs it.
        self.logit_bias = jax.device_put(jnp.zeros((rows, cfg.vocab_size), jnp.float32), replicated)
        self.prefill_bias = jax.device_put(jnp.zeros((config.max_prefill_batch, cfg.vocab_size), jnp.float32),
                                           replicated)
        # Structured outputs: each constrained request's grammar, and its token mask rows on the device.
        self.grammar = GrammarMasks(model.tokenizer, cfg.vocab_size, cfg.eos_token_ids)
        self.masks = DeviceMasks(model.mesh, rows, config.max_prefill_batch, self.grammar.words)
        impl = config.attention_impl
        self.fine_widths = (model_attention_impl(impl) == "reference" if config.fine_page_table_widths is None
                            else config.fine_page_table_widths)
        self.fine_prompts = (model_attention_impl(impl) in ("xla", "reference") if config.fine_prompt_buckets is None
                             else config.fine_prompt_buckets)
        mesh = model.mesh
        # Prefill runs as separate jits per stage, one compiled layer for every layer, so each
        # layer's K/V is a separate device array, ready (and sendable) while later layers compute.
        layer_graphdef, self.layer_params = serving.split_layers(model.graphdef, model.params)
        self.embed = jax.jit(functools.partial(serving.prefill_embed, model.graphdef))
        self._layer = jax.jit(functools.partial(serving.prefill_layer, layer_graphdef, impl, mesh))
        self._first_tokens = jax.jit(functools.partial(_logits_and_sample, model.graphdef))
        self._prompt_logprobs = jax.jit(functools.partial(prompt_logprobs, model.graphdef))
        self._insert = jax.jit(insert_prefill, donate_argnums=0)
        self.prefix_cache = (PrefixCache(model, self.cache_spec, config.prefix_cache_pages, layer_graphdef, self._insert,
                                         impl) if config.prefix_cache_pages else None)
        self.chunked = (ChunkedPrefill(self, layer_graphdef, config.prefill_chunk_tokens)
                        if config.prefill_chunk_tokens else None)
        # Per row of the latest prefill: its prompt tokens taken from the prefix cache (the answer's
        # cached_prompt_tokens). Read by the one thread that prefills, right after its prefill.
        self.last_cached_tokens: list[int] = []
        self._decode = jax.jit(functools.partial(_decode_and_sample, model.graphdef, impl, mesh), donate_argnums=(1, 2))
        self._zero_rows = jax.jit(functools.partial(_zero_rows, mesh), donate_argnums=(0, 1))
        self._set_bias_row = jax.jit(functools.partial(_set_bias_row, mesh), donate_argnums=0)
        self._set_prompt_row = jax.jit(functools.partial(_set_prompt_row, mesh), donate_argnums=0)

    # -- shapes ---------------------------------------------------------------------------
    def prefill_shape(self, lengths: list[int]) -> tuple[int, int]:
        batch = bucket(len(lengths), minimum=1, maximum=max(self.config.max_prefill_batch, len(lengths)))
        return batch, self.padded_prompt_len(max(lengths))

    def prompt_buckets(self) -> list[int]:
        """Every padded prompt length a prefill or insert may use."""
        return all_buckets(minimum=self.config.min_prefill_bucket, maximum=self.max_model_len, fine=self.fine_prompts)

    def page_table_widths(self) -> list[int]:
        """Every page-table width a decode step or insert may use."""
        return all_buckets(minimum=min(self.config.min_page_table_width, self.max_pages_per_seq),
                           maximum=self.max_pages_per_seq, fine=self.fine_widths)

    def page_table(self, page_lists: list[list[int]], batch: int) -> np.ndarray:
        width = bucket(max(len(p) for p in page_lists), minimum=min(self.config.min_page_table_width,
                       self.max_pages_per_seq), maximum=self.max_pages_per_seq, fine=self.fine_widths)
        table = np.full((batch, width), SINK_PAGE, np.int32)
        for row, pages in enumerate(page_lists):
            table[row, : len(pages)] = pages[:width]
        return table

    # -- steps ----------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], sampling: list, steps: list[int]):
        """Runs prompts; returns (first tokens as host ints, k, v, padded lengths)."""
        (first, _, _), ks, vs, lengths = self.prefill_sampled(prompts, sampling, steps)
        return first, ks, vs, lengths

    def prefill_sampled(self, prompts: list[list[int]], sampling: list, steps: list[int]):
        """As prefill, with each row's first-token log-probabilities and prompt logprobs (None where
        not asked): ((first tokens, logprobs, prompt logprobs), k, v, padded lengths)."""
        first, ks, vs, lengths = self.prefill_async(prompts, sampling, steps)
        host = (*first.to_host(sampling), first.prompt_to_host(sampling, [len(p) for p in prompts]))
        return host, ks, vs, lengths

    def prefill_async(self, prompts: list[list[int]], sampling: list, steps: list[int]):
        """Dispatches the prefill without waiting: (first tokens as a Sampled, k, v) are device arrays,
        each layer's K/V ready as soon as that layer is done; plus the padded lengths (host).

        With prefix caching, rows whose prompt starts with cached blocks compute only the rest;
        k/v are still each row's whole prompt, as the KV handoff and the insert expect."""
        hits = self.prefix_cache.hits(prompts, sampling) if self.prefix_cache is not None else None
        self.last_cached_tokens = [hit.tokens for hit in hits] if hits is not None else [0] * len(prompts)
        if hits is None:
            first, ks, vs, lengths = self._prefill_whole(prompts, sampling, steps)
        else:
            first, ks, vs, lengths = self._prefill_after_prefix(prompts, hits, sampling, steps)
        if self.prefix_cache is not None:
            self.prefix_cache.store(prompts, ks, vs)
        return first, ks, vs, lengths

    def _prefill_whole(self, prompts, sampling, steps):
        batch, seq = self.prefill_shape([len(p) for p in prompts])
        tokens, lengths = padded_rows(prompts, batch, seq)
        arrays = self.sampling_arrays(sampling, steps, batch)
        x = self.embed(self.model.params, tokens)
        ks, vs = [], []
        for layer_params in self.layer_params:
            x, k, v = self._layer(layer_params, x, lengths)
            ks.append(k)
            vs.append(v)
        first = self._first_tokens(self.model.params, x, tokens, lengths, arrays, self.prefill_bias, self.masks.prefill)
        return self._with_prompt_logprobs(first, x, tokens, sampling), tuple(ks), tuple(vs), lengths

    def _prefill_after_prefix(self, prompts, hits, sampling, steps):
        cache = self.prefix_cache
        new_parts = [p[hit.tokens:] for p, hit in zip(prompts, hits)]
        batch, _ = self.prefill_shape([len(p) for p in new_parts])
        # New tokens in power-of-two buckets: these programs compile on first use (pairs of new tokens
        # and prompt lengths are too many to warm), and padding the few new tokens costs little. The
        # prompt's width keeps the platform's buckets: attention and the K/V out span all of it.
        seq = bucket(max(len(p) for p in new_parts), minimum=self.config.min_prefill_bucket,
                     maximum=self.max_model_len)
        width = self.padded_prompt_len(max(len(p) for p in prompts))
        tokens, lengths = padded_rows(new_parts, batch, seq)
        prompt_tokens, prompt_lengths = padded_rows(prompts, batch, width)
        table, prefix_lengths = cache.block_table(hits, batch, width)
        arrays = self.sampling_arrays(sampling, steps, batch)
        x = self.embed(self.model.params, tokens)
        x, ks, vs = cache.layers(width, self.layer_params, x, lengths, table, prefix_lengths)
        first = cache.first_tokens(self.model.params, x, lengths, prompt_tokens, prompt_lengths, arrays,
                                   self.prefill_bias, self.masks.prefill)
        # Rows that ask for prompt logprobs were not looked up (PrefixCache.hits): x covers their whole prompt.
        return self._with_prompt_logprobs(first, x, tokens, sampling), ks, vs, prompt_lengths

    def sampling_arrays(self, sampling, steps, batch) -> SamplingArrays:
        for row, params in enumerate(sampling):
            if params.biased:
                if row >= self.config.max_prefill_batch:
                    raise ValueError(f"a prefill batch with logit biases holds at most {self.config.max_prefill_batch}")
                self.prefill_bias = self._set_bias_row(self.prefill_bias, np.int32(row),
                                                       bias_vector(params, self.model.config.vocab_size))
        self.masks.write_prefill(self.grammar.first_masks(sampling))
        return SamplingArrays.build(sampling, steps, batch, self.model.config.eos_token_ids,
                                    bias_rows=list(range(len(sampling))))

    def _with_prompt_logprobs(self, first, x, tokens, sampling):
        if any(p.prompt_logprobs is not None for p in sampling):
            first = dataclasses.replace(first, prompt=self._prompt_logprobs(self.model.params, x, tokens))
        return first

    def insert(self, ks, vs, page_lists: list[list[int]], lengths: np.ndarray) -> None:
        # Only the pages the prompt's KV fills: the table width then follows the prompt bucket,
        # whatever max_tokens reserved, so one insert shape per bucket.
        prompt_pages = -(-ks[0].shape[1] // self.config.page_size)
        table = self.page_table([pages[:prompt_pages] for pages in page_lists], batch=ks[0].shape[0])
        lengths = np.where(np.arange(len(lengths)) < len(page_lists), lengths, 0).astype(np.int32)
        self.cache = self._insert(self.cache, ks, vs, table, lengths)

    def decode(self, tokens: list[int], positions: list[int], page_lists: list[list[int]],
               sampling: list, steps: list[int], request_ids: list[str] | None = None,
               prompts: list | None = None) -> list[int]:
        return self.decode_sampled(tokens, positions, page_lists, sampling, steps, request_ids, prompts)[0]

    def decode_sampled(self, tokens: list[int], positions: list[int], page_lists: list[list[int]],
                       sampling: list, steps: list[int], request_ids: list[str] | None = None,
                       prompts: list | None = None) -> tuple[list[int], list]:
        """As decode, with each row's log-probabilities (None where not asked). `request_ids`: every
        running request, in row order (needed for penalties: runtime/penalty_rows.py); `prompts`: their
        prompt ids (needed for a repetition penalty; None, or an empty one, where it is not asked)."""
        inputs = self.decode_inputs(tokens, positions, page_lists, sampling, steps, request_ids, prompts)
        return self.decode_step(inputs).to_host(sampling)

    def decode_step(self, inputs: tuple) -> Sampled:
        """Runs one compiled decode step on `decode_inputs(...)`; returns the sampled tokens (a Sampled
        of device arrays) without waiting for them (the cache and the penalty counts are updated in place)."""
        next_tokens, self.cache, self.penalty_counts = self._decode(self.model.params, self.cache, self.penalty_counts,
                                                                    self.logit_bias, self.masks.decode, *inputs)
        return next_tokens

    def decode_inputs(self, tokens: list[int], positions: list[int], page_lists: list[list[int]],
                      sampling: list, steps: list[int], request_ids: list[str] | None = None,
                      prompts: list | None = None) -> tuple:
        """The decode program's inputs after the params, the cache and the penalty counts, padded to
        the batch bucket. Readies the counts rows handed out to new penalised requests."""
        rows, fresh = self.penalty_rows.rows_for(request_ids, sampling, steps)
        self._ready_fresh_rows([rows[i] for i in fresh], [sampling[i] for i in fresh],
                               [None if prompts is None else prompts[i] for i in fresh])
        self.masks.write_decode(rows, self.grammar.step_masks(request_ids, sampling, steps, tokens))
        n = len(tokens)
        batch = bucket(n, minimum=min(self.config.min_decode_batch, self.config.max_batch),
                       maximum=max(self.config.max_batch, n))
        pad = batch - n
        return (np.array(tokens + [0] * pad, np.int32), np.array(positions + [0] * pad, np.int32),
                self.page_table(page_lists, batch), np.array([True] * n + [False] * pad),
                SamplingArrays.build(sampling, steps, batch, self.model.config.eos_token_ids, rows, rows))

    def _ready_fresh_rows(self, rows: list[int], params: list, prompts: list) -> None:
        """Zeroes the counts and bias rows of new requests that need rows; then those with a
        repetition penalty get their prompt's flags, and those with a bias their bias row."""
        if rows:
            padded = np.full(self.config.max_batch, self.config.max_batch, np.int32)  # one shape: out of range = none
            padded[: len(rows)] = rows
            self.penalty_counts, self.logit_bias = self._zero_rows(self.penalty_counts, self.logit_bias, padded)
        for row, p in zip(rows, params):
            if p.biased:
                self.logit_bias = self._set_bias_row(self.logit_bias, np.int32(row),
                                                     bias_vector(p, self.model.config.vocab_size))
        for row, p, prompt in zip(rows, params, prompts):
            if p.repetition_penalty != 1.0:
                if prompt is None or len(prompt) == 0:
                    raise ValueError("a repetition penalty needs the request's prompt ids")
                in_prompt = np.zeros(self.model.config.vocab_size, bool)
                in_prompt[np.asarray(prompt)] = True  # ids were checked against the vocabulary on arrival
                self.penalty_counts = self._set_prompt_row(self.penalty_counts, np.int32(row), in_prompt)

    # -- warm-up --------------------------------------------------------------------------
    def warm_up(self, *, decode: bool, full: bool = True) -> int:
        """Compiles every bucketed shape (runtime/warmup.py); returns the number of programs."""
        from splitserve.runtime.warmup import compile_all

        return compile_all(self, decode=decode, full=full)

    # -- KV handoff -----------------------------------------------------------------------
    def kv_to_host(self, ks, vs, row: int, length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One prefilled row's K/V as host arrays [length, model's kv_heads, head_dim] per layer."""
        k_layers, v_layers = PrefilledRow(ks, vs, row, length).host_layers(self.model.layout.kv_source)
        return list(k_layers), list(v_layers)

    def insert_kv(self, kvs: list, page_lists: list[list[int]], lengths: list[int]) -> None:
        """Writes admitted requests' K/V into their pages.

        Each entry is either a transferred (k_layers, v_layers) pair of host arrays
        [tokens, model's kv_heads, head_dim], or a PrefilledKV still on this device.
        """
        on_device = [i for i, kv in enumerate(kvs) if isinstance(kv, PrefilledRow)]
        for i in on_device:  # colocated: the whole prefill batch goes in with only this row valid,
            kv = kvs[i]      # so there is no slicing program and the insert shape is the prefill's
            batch = kv.ks[0].shape[0]
            rows_pages = [[] for _ in range(batch)]
            rows_pages[kv.row] = page_lists[i]
            rows_lengths = np.zeros((batch,), np.int32)
            rows_lengths[kv.row] = lengths[i]
            self.insert(kv.ks, kv.vs, rows_pages, rows_lengths)
        host = [i for i in range(len(kvs)) if i not in on_device]
        if host:
            self._insert_host_kv([kvs[i] for i in host], [page_lists[i] for i in host], [lengths[i] for i in host])

    def _insert_host_kv(self, kvs: list[tuple[list[np.ndarray], list[np.ndarray]]],
                        page_lists: list[list[int]], lengths: list[int]) -> None:
        """Inserts transferred KV one request at a time, straight from its receive buffers when they
        are already padded to the prompt bucket (see padded_prompt_len), then recycles them."""
        kv_source = self.model.layout.kv_source
        identity_heads = list(kv_source) == list(range(len(kv_source)))
        for (k_layers, v_layers), pages, length in zip(kvs, page_lists, lengths):
            seq = self.padded_prompt_len(length)

            def padded(host):  # [length, model's kv_heads, head_dim] -> [1, seq, serving kv_heads, head_dim]
                if identity_heads and self.staging.owns(host.base) and host.base.shape[0] == seq:
                    return host.base[None]  # the receive buffer itself: no host copy
                out = np.zeros((1, seq, len(kv_source), self.cache_spec.head_dim), self.cache_spec.dtype)
                out[0, : host.shape[0]] = expand_to_serving_heads(host, kv_source)
                return out

            ks, vs = tuple(padded(x) for x in k_layers), tuple(padded(x) for x in v_layers)
            self.insert(ks, vs, [pages], np.array([length], np.int32))
            jax.block_until_ready(self.cache)  # the device has its copy: the buffers may be reused
            self.recycle_host_kv((k_layers, v_layers))

    def recycle_host_kv(self, kv) -> None:
        """Returns the receive buffers of transferred KV (from kv_wire.receive_kv) to the pool."""
        if isinstance(kv, PrefilledRow):
            return  # on the device: nothing to recycle
        k_layers, v_layers = kv
        self.staging.give_back([x.base for x in list(k_layers) + list(v_layers) if x.base is not None])

    def padded_prompt_len(self, length: int) -> int:
        """Token rows a prompt's KV is padded to for insertion (the prefill length bucket)."""
        return bucket(length, minimum=self.config.min_prefill_bucket, maximum=self.max_model_len,
                      fine=self.fine_prompts)
