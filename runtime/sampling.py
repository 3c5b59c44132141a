"""On-device sampling of the next token from the logits.

Per-request randomness comes from `fold_in(key(seed), step)`, where step is the index of
the token being generated: the same seed gives the same tokens whatever else is in the
batch and whether the token is sampled by prefill or by decode.

min_tokens: until a row has that many tokens, the ids that would end it (EOS unless ignore_eos,
and its stop_token_ids) get a logit of -inf, as vLLM's and transformers' min-tokens processors
do. They travel as a fixed-width id list per row, so the program's shapes do not depend on them.

Penalties (presence, frequency, repetition): the decode step passes each penalised row's counts
(runtime/penalty_rows.py): how many times each id has been generated, plus IN_PROMPT where the
id is in the prompt (set only for rows with a repetition penalty). The prefill builds the same
from the prompt. The penalised logits are built only in steps where some row has a penalty.

logit_bias and allowed_token_ids: a request that sets either has a row of bias values ([rows,
vocab] f32 on the device, -inf where allowed_token_ids leaves an id out), written once when the
request starts (bias_vector) and added first, as vLLM does, so greedy requests see it too.

Structured outputs: a constrained row has a row of token bitmasks ([rows, vocab / 32] i32 on the
device, written before each step from the request's grammar: runtime/grammar_masks.py); ids whose
bit is clear get -inf first, with the bias, so nothing outside the grammar can be sampled.

logprobs: rows that ask get the log-softmax of the raw logits (runtime/logprobs.py) for the
sampled token and the MAX_LOGPROBS most likely; computed only when some row of the step asks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.prompt_logprobs import PromptLogprobs
from splitserve.runtime.sampling_cutoff import cutoff
from splitserve.runtime.sampling_params import MAX_HELD_BACK_STOP_IDS, MAX_LOGPROBS, SamplingParams  # no JAX

NO_ID = np.iinfo(np.int32).max  # pads a row's held-back ids: outside any vocabulary, so the mask drops it
# A penalty count's bit for "in the prompt"; the bits below count generations (a request has far
# fewer than 2**24 tokens).
IN_PROMPT = 1 << 24


def held_back_width(eos_token_ids: tuple[int, ...]) -> int:
    """Columns of SamplingArrays.held_back for a model: its EOS ids plus a request's stop ids."""
    return len(eos_token_ids) + MAX_HELD_BACK_STOP_IDS


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling state for one device step (host numpy, padded to the batch bucket)."""

    temperature: np.ndarray  # f32[batch]
    top_k: np.ndarray  # i32[batch]
    top_p: np.ndarray  # f32[batch]
    min_p: np.ndarray  # f32[batch]: 0 = off
    seed: np.ndarray  # u32[batch]
    step: np.ndarray  # i32[batch], index of the token being sampled
    held_back: np.ndarray  # i32[batch, held_back_width]: ids masked this step (min_tokens), NO_ID padded
    logprobs: np.ndarray  # bool[batch]: the row wants log-probabilities
    presence: np.ndarray  # f32[batch]: presence_penalty
    frequency: np.ndarray  # f32[batch]: frequency_penalty
    repetition: np.ndarray  # f32[batch]: repetition_penalty (1: off)
    penalty_row: np.ndarray  # i32[batch]: the row's counts row (runtime/penalty_rows.py); out of range: none
    bias_row: np.ndarray  # i32[batch]: the row's logit bias row; NO_ID: none
    grammar_row: np.ndarray  # i32[batch]: the row's token mask row (structured outputs); NO_ID: none

    @classmethod
    def build(cls, params: list[SamplingParams], steps: list[int], batch: int,
              eos_token_ids: tuple[int, ...] = (), penalty_rows: list[int] | None = None,
              bias_rows: list[int] | None = None) -> "SamplingArrays":
        """`bias_rows`: each biased (or constrained) request's row of the bias (and mask) arrays the step
        gets (the others: ignored)."""
        pad = batch - len(params)
        rows = list(penalty_rows) if penalty_rows is not None else [NO_ID] * len(params)
        biased = [row if p.biased else NO_ID for row, p in zip(bias_rows or [NO_ID] * len(params), params)]
        masked = [row if p.structured_outputs is not None else NO_ID
                  for row, p in zip(bias_rows or [NO_ID] * len(params), params)]
        held_back = np.full((batch, held_back_width(eos_token_ids)), NO_ID, np.int32)
        for row, (p, step) in enumerate(zip(params, steps)):
            if step < p.min_tokens:
                ids = p.stop_token_ids + (() if p.ignore_eos else tuple(eos_token_ids))
                held_back[row, : len(ids)] = ids
        return cls(
            temperature=np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
            top_k=np.array([p.top_k for p in params] + [0] * pad, np.int32),
            top_p=np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
            min_p=np.array([p.min_p for p in params] + [0.0] * pad, np.float32),
            seed=np.array([p.seed or 0 for p in params] + [0] * pad, np.uint32),
            step=np.array(list(steps) + [0] * pad, np.int32),
            held_back=held_back,
            logprobs=np.array([p.logprobs is not None for p in params] + [False] * pad),
            presence=np.array([p.presence_penalty for p in params] + [0.0] * pad, np.float32),
            frequency=np.array([p.frequency_penalty for p in params] + [0.0] * pad, np.float32),
            repetition=np.array([p.repetition_penalty for p in params] + [1.0] * pad, np.float32),
            penalty_row=np.array(rows + [NO_ID] * pad, np.int32),
            bias_row=np.array(biased + [NO_ID] * pad, np.int32),
            grammar_row=np.array(masked + [NO_ID] * pad, np.int32),
        )


jax.tree_util.register_dataclass(
    SamplingArrays, data_fields=["temperature", "top_k", "top_p", "min_p", "seed", "step", "held_back", "logprobs",
                                 "presence", "frequency", "repetition", "penalty_row", "bias_row",
                                 "grammar_row"],
    meta_fields=[]
)


def _sample_filtered(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """vLLM's order: temperature, then min_p, then top-k and top-p over what min_p kept.

    Together they keep every token whose logit is at least a per-row cutoff (sampling_cutoff.py,
    searched for only in steps where some row filters); the draw is over the vocabulary as it is,
    so a row that filters nothing draws the same token either way."""
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    filtering = jnp.any((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
    scaled = jax.lax.cond(
        filtering, lambda x: jnp.where(x >= cutoff(x, s.top_k, s.top_p, s.min_p)[:, None], x, -jnp.inf),
        lambda x: x, scaled)

    def draw(seed, step, row):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, row)

    return jax.vmap(draw)(s.seed, s.step, scaled)


def _held_back_mask(shape: tuple[int, int], held_back: jax.Array) -> jax.Array:
    """f32[batch, vocab]: -inf at each row's held-back ids, 0 elsewhere."""
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, jnp.float32).at[rows, held_back].set(-jnp.inf, mode="drop")  # NO_ID: dropped


@dataclasses.dataclass(frozen=True)
class Sampled:
    """A step's sampled tokens and, for the rows that asked, their log-probabilities (device arrays;
    zeros when no row of the step asked)."""

    tokens: jax.Array  # i32[batch]
    logprob: jax.Array  # f32[batch]: of the sampled token
    top_ids: jax.Array  # i32[batch, k]: the k = min(MAX_LOGPROBS, vocab) most likely, most likely first
    top_logprobs: jax.Array  # f32[batch, k]
    prompt: PromptLogprobs | None = None  # a prefill's, when some row asked for prompt_logprobs

    def to_host(self, params: list[SamplingParams]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The first len(params) rows: token ids, and each row's TokenLogprobs (None where not asked).
        Waits for the step; reads the log-probabilities back only when some row asked."""
        n = len(params)
        tokens = np.asarray(self.tokens)[:n].tolist()
        if all(p.logprobs is None for p in params):
            return tokens, [None] * n
        logprob, top_ids, top = (np.asarray(a)[:n] for a in (self.logprob, self.top_ids, self.top_logprobs))
        return tokens, [None if p.logprobs is None else TokenLogprobs(
            float(logprob[row]), tuple(zip(top_ids[row, : p.logprobs].tolist(), top[row, : p.logprobs].tolist())))
            for row, p in enumerate(params)]


    def prompt_to_host(self, params: list[SamplingParams], prompt_lengths: list[int]
                       ) -> list[list[TokenLogprobs] | None]:
        """Each row's prompt logprobs (runtime/prompt_logprobs.py; None where not asked)."""
        if self.prompt is None:
            return [None] * len(params)
        return self.prompt.to_host(params, prompt_lengths)


jax.tree_util.register_dataclass(Sampled, data_fields=["tokens", "logprob", "top_ids", "top_logprobs", "prompt"],
                                 meta_fields=[])


def sample(logits: jax.Array, s: SamplingArrays, counts: jax.Array | None = None,
           prompt: tuple[jax.Array, jax.Array] | None = None, bias: jax.Array | None = None,
           masks: jax.Array | None = None) -> Sampled:
    """f32[batch, vocab] -> Sampled. Temperature 0 rows are greedy (argmax).

    `bias`: f32[rows, vocab], the logit bias rows that s.bias_row points into (None: no bias).
    `masks`: i32[rows, ceil(vocab / 32)], the token bitmasks that s.grammar_row points into (None: none).

    Penalties need one of: `counts`, i32[rows, vocab], each penalised row's generated tokens and
    prompt flags (decode, rows picked by s.penalty_row); or `prompt`, (i32[batch, seq] padded
    prompts, i32[batch] lengths) (prefill: nothing is generated yet, only the repetition penalty
    can apply). Neither: no penalties."""
    # The adjustments are added, not scattered into the logits, and only in a branch that returns
    # tokens: a scatter into them made XLA copy the logits on every step, adjusted or not ([64,
    # 32000] f32 on a 2-core CPU: 6.0 ms against 3.5).
    adjust = jnp.any(s.held_back != NO_ID)
    if counts is not None:
        adjust |= jnp.any((s.presence != 0) | (s.frequency != 0))
    if counts is not None or prompt is not None:
        adjust |= jnp.any(s.repetition != 1)
    if bias is not None:
        adjust |= jnp.any(s.bias_row != NO_ID)
    if masks is not None:
        adjust |= jnp.any(s.grammar_row != NO_ID)

    def adjusted(x):
        if masks is not None:  # the grammar first: nothing outside it, whatever the bias says
            x = jnp.where(_mask_bits(masks, s.grammar_row, x.shape[-1]), x, -jnp.inf)
        if bias is not None:  # vLLM's order: allowed ids and logit bias, min_tokens, then penalties
            x = x + jnp.take(bias, s.bias_row, axis=0, mode="fill", fill_value=0)
        x = x + _held_back_mask(x.shape, s.held_back)
        if counts is not None:
            x = _penalised(x, jnp.take(counts, s.penalty_row, axis=0, mode="fill", fill_value=0), s)
        elif prompt is not None:
            x = _penalised(x, _prompt_flags(x.shape, *prompt), s)
        return _sample(x, s)

    tokens = jax.lax.cond(adjust, adjusted, lambda x: _sample(x, s), logits)
    k = min(MAX_LOGPROBS, logits.shape[-1])
    batch = logits.shape[0]
    none = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch, k), jnp.float32))
    logprob, top_ids, top = jax.lax.cond(jnp.any(s.logprobs), lambda x: _logprobs(x, tokens, k), lambda x: none,
                                         logits)
    return Sampled(tokens, logprob, top_ids, top)


def _mask_bits(masks: jax.Array, rows: jax.Array, vocab: int) -> jax.Array:
    """bool[batch, vocab]: each row's allowed ids from its bitmask row (rows out of range: all allowed)."""
    words = jnp.take(masks, rows, axis=0, mode="fill", fill_value=-1)  # -1: every bit set
    ids = jnp.arange(vocab)
    return (jnp.take(words, ids // 32, axis=1) >> (ids % 32)) & 1 == 1


def bias_vector(params: SamplingParams, vocab_size: int) -> np.ndarray:
    """f32[vocab]: a biased request's row: -inf outside allowed_token_ids (if set), plus logit_bias.
    Ids outside the vocabulary were refused on arrival (request.check_bias_ids)."""
    row = np.zeros(vocab_size, np.float32)
    if params.allowed_token_ids is not None:
        row[:] = -np.inf
        row[np.asarray(params.allowed_token_ids, np.int64)] = 0.0
    for token, value in params.logit_bias:
        row[token] += value
    return row


def _penalised(logits: jax.Array, counts: jax.Array, s: SamplingArrays) -> jax.Array:
    """vLLM's order: the repetition penalty (transformers' formula) over prompt and generated
    tokens, then OpenAI's frequency and presence penalties over generated tokens."""
    rep = s.repetition[:, None]
    logits = jnp.where(counts > 0, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    generated = (counts & (IN_PROMPT - 1)).astype(jnp.float32)
    return logits - s.frequency[:, None] * generated - s.presence[:, None] * (generated > 0)


def _prompt_flags(shape: tuple[int, int], tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """i32[batch, vocab]: IN_PROMPT at each row's prompt ids (the first `lengths` of `tokens`)."""
    rows = jnp.arange(shape[0])[:, None]
    inside = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return jnp.zeros(shape, jnp.int32).at[rows, tokens].max(jnp.where(inside, IN_PROMPT, 0))


def _logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top, top_ids = jax.lax.top_k(logprobs, k)
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top


def _sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: _sample_filtered(logits, s).astype(jnp.int32),
        lambda: greedy,  # no cutoff search or draw when the whole batch is greedy
    )
    return jnp.where(s.temperature > 0, sampled, greedy)
