"""Compiling every bucketed shape before a worker reports SERVING, without running them.

Running a 8 x 2048-token prefill just to compile it costs seconds of compute on a CPU; an
ahead-of-time `jit(...).lower(args).compile()` costs only the compilation, and a later call
with the same shapes reuses the executable. Inputs are the real arguments where they are
cheap (token arrays, the cache, params) and the compiled producer's output shapes where
they are not (the hidden states and K/V between prefill stages), so the compiled programs
are exactly the ones serving will ask for. tests/test_warmup.py checks that serving after
`compile_all` triggers no compilation at all.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from splitserve.runtime.buckets import all_buckets
from splitserve.runtime.sampling import SamplingArrays
from splitserve.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=2)


def compile_all(runner, *, decode: bool, full: bool = True) -> int:
    """Compiles prefill for every (batch, prompt) bucket, and with `decode` the KV inserts and the
    decode step for every (batch, page-table width) bucket. `full=False`: smallest lengths only.
    Returns the number of programs compiled."""
    cfg = runner.config
    seqs = runner.prompt_buckets()
    count = 0
    for batch in all_buckets(minimum=1, maximum=cfg.max_prefill_batch):
        for seq in seqs if full else seqs[:1]:
            count += _compile_prefill(runner, batch, seq, decode)
    if runner.chunked is not None and full:
        for width in seqs:
            if width > runner.chunked.chunk_tokens:
                count += _compile_chunked(runner, width)
    if decode:
        widths = runner.page_table_widths()
        for batch in all_buckets(minimum=min(cfg.min_decode_batch, cfg.max_batch), maximum=cfg.max_batch):
            for width in widths if full else widths[:1]:
                _compile(runner._decode, runner.model.params, runner.cache, runner.penalty_counts,
                         runner.logit_bias, runner.masks.decode, np.zeros(batch, np.int32),
                         np.zeros(batch, np.int32), np.zeros((batch, width), np.int32), np.ones(batch, bool),
                         _sampling(batch, runner))
                count += 1
        rows = np.zeros(cfg.max_batch, np.int32)  # zeroing the counts and biases of new requests: one shape
        _compile(runner._zero_rows, runner.penalty_counts, runner.logit_bias, rows)
        _compile(runner._set_prompt_row, runner.penalty_counts, np.int32(0),  # and of repetition-penalised ones
                 np.zeros(runner.model.config.vocab_size, bool))
        count += 2
    # Writing a request's logit bias row: for decoding requests, and for the prefill's batch rows.
    # (max_batch == max_prefill_batch: the two have one shape, so one program.)
    biases = [runner.prefill_bias]
    if decode and runner.logit_bias.shape != runner.prefill_bias.shape:
        biases.append(runner.logit_bias)
    for bias in biases:
        _compile(runner._set_bias_row, bias, np.int32(0), np.zeros(bias.shape[1], np.float32))
        count += 1
    # Writing the token masks of structured outputs: the prefill's rows, and the decoding requests'.
    for masks in [runner.masks.prefill] + ([runner.masks.decode] if decode else []):
        if masks is runner.masks.prefill or masks.shape != runner.masks.prefill.shape:
            _compile(runner.masks.set_rows, masks, np.zeros(masks.shape[0], np.int32), np.zeros(masks.shape, np.int32))
            count += 1
    return count


def _compile_prefill(runner, batch: int, seq: int, decode: bool) -> int:
    params = runner.model.params
    tokens, lengths = np.zeros((batch, seq), np.int32), np.ones((batch,), np.int32)
    x = _compile(runner.embed, params, tokens)
    count, seen = 1, []
    while x not in seen:  # the first layer is fed by the embedding, the others by a layer
        seen.append(x)
        x, k, v = _compile(runner._layer, runner.layer_params[0], x, lengths)
        count += 1
    _compile(runner._first_tokens, params, x, tokens, lengths, _sampling(batch, runner), runner.prefill_bias,
             runner.masks.prefill)
    count += 1
    if runner.prefix_cache is not None:  # every prefill stores its prompts' new blocks in the pool
        pool = runner.prefix_cache.pool
        table = np.zeros((batch, -(-seq // runner.config.page_size)), np.int32)
        _compile(runner._insert, pool, (k,) * len(pool.k), (v,) * len(pool.v), table, lengths)
        count += 1
    if decode:
        layers = runner.cache_spec.num_layers
        table = runner.page_table([[1] * -(-seq // runner.config.page_size)] * batch, batch)
        _compile(runner._insert, runner.cache, (k,) * layers, (v,) * layers, table, lengths)  # on-device KV
        count += 1
        if batch == 1:  # transferred KV arrives as host arrays, one request at a time
            host = np.zeros(k.shape, k.dtype)
            _compile(runner._insert, runner.cache, (host,) * layers, (host,) * layers, table, lengths)
            count += 1
    return count


def _compile_chunked(runner, width: int) -> int:
    """The chunks of a prompt padded to `width` (runtime/chunked_prefill.py): its first chunk at every
    length up to a chunk, with no prefix; every later chunk (exactly a chunk) after the earlier ones;
    the first token after the last. (The embedding of each chunk is a batch-1 prefill's.)"""
    chunked, params = runner.chunked, runner.model.params
    full = runner.padded_prompt_len(chunked.chunk_tokens)
    prefix_lengths, count = np.zeros((1,), np.int32), 0
    for seq in runner.prompt_buckets():
        if seq > full:
            break
        tokens, lengths = np.zeros((1, seq), np.int32), np.ones((1,), np.int32)
        x, seen = _compile(runner.embed, params, tokens), []
        while x not in seen:
            seen.append(x)
            x, k, v = _compile(chunked.layer, width, runner.layer_params[0], x, lengths, None, None, prefix_lengths)
            count += 1
    # A later chunk's layer takes x from the embedding or a layer, and K/V from the chunk before
    # (either kind of layer): every combination of their layouts, until no new one appears.
    xs, kvs, compiled, outs = [_compile(runner.embed, params, tokens)], [(k, v)], [], []
    while new := [(x, kv) for x in xs for kv in kvs if (x, kv) not in compiled]:
        for x, (k, v) in new:
            compiled.append((x, (k, v)))
            out, k_out, v_out = _compile(chunked.layer, width, runner.layer_params[0], x, lengths, k, v, prefix_lengths)
            outs += [out] if out not in outs else []
            xs += [out] if out not in xs else []
            kvs += [(k_out, v_out)] if (k_out, v_out) not in kvs else []
    prompt = np.zeros((1, width), np.int32)
    for x in outs:  # the last layer's
        _compile(chunked.first_tokens, params, x, lengths, prompt, lengths, _sampling(1, runner), runner.prefill_bias,
                 runner.masks.prefill)
    return count + len(compiled) + len(outs)


def _sampling(batch: int, runner) -> SamplingArrays:
    return SamplingArrays.build([GREEDY] * batch, [0] * batch, batch, runner.model.config.eos_token_ids)


def _compile(jitted, *args):
    """Compiles `jitted` for these arguments; returns its outputs' shapes for the next stage."""
    return jax.tree.map(_as_argument, jitted.lower(*args).compile().out_info)


def _as_argument(info: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    # A single-device result is uncommitted at run time, and a spec naming its device would
    # compile a different (committed) program; a mesh result keeps its sharding.
    sharding = None if isinstance(info.sharding, SingleDeviceSharding) else info.sharding
    return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)
