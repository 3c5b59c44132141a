"""Log-probabilities of the prompt's own tokens (vLLM's prompt_logprobs), from the prefill.

The prefill already has the last layer's hidden states of every prompt position. For a request
that asks, position t's logits give the log-probability of prompt token t + 1 and the N most
likely tokens there: the log-softmax of the model's own logits, as for generated tokens
(runtime/logprobs.py). The first prompt token has none (nothing comes before it), so a prompt
of L tokens gets L - 1 entries.

The logits of every position are [batch, seq, vocab]: too large to hold at once for long
prompts and large vocabularies (2048 x 128256 float32 is 1 GiB a row), so they are made a few
positions at a time and only the logprobs kept. Computed only in prefills where some request
asks; the program compiles on the first such prefill of each shape (warm-up leaves it out).
Every entry travels in the stream's first message: the router refuses a request whose entries
would not fit in one (runtime/router.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.sampling_params import MAX_LOGPROBS, SamplingParams

POSITIONS_AT_ONCE = 8  # logits held at a time: batch x 8 x vocab


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Device arrays; position t is about prompt token t + 1 (the last position is padding)."""

    logprob: jax.Array  # f32[batch, seq]
    top_ids: jax.Array  # i32[batch, seq, k], k = min(MAX_LOGPROBS, vocab), most likely first
    top_logprobs: jax.Array  # f32[batch, seq, k]
    rank: jax.Array  # i32[batch, seq]: prompt token t + 1's rank in the vocabulary (tokens at least as likely)

    def to_host(self, params: list[SamplingParams], prompt_lengths: list[int]) -> list[list[TokenLogprobs] | None]:
        """Each request's entries (None where not asked): one per prompt token after the first."""
        n = len(params)
        logprob, top_ids, top, rank = (np.asarray(a)[:n] for a in (self.logprob, self.top_ids, self.top_logprobs,
                                                                  self.rank))
        return [None if p.prompt_logprobs is None else [
            TokenLogprobs(float(logprob[row, t]),
                          tuple(zip(top_ids[row, t, : p.prompt_logprobs].tolist(),
                                    top[row, t, : p.prompt_logprobs].tolist())), int(rank[row, t]))
            for t in range(length - 1)] for row, (p, length) in enumerate(zip(params, prompt_lengths))]


jax.tree_util.register_dataclass(PromptLogprobs, data_fields=["logprob", "top_ids", "top_logprobs", "rank"],
                                 meta_fields=[])


def prompt_logprobs(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, tokens: jax.Array) -> PromptLogprobs:
    """x: f32[batch, seq, hidden], the last layer's output; tokens: i32[batch, seq], the padded prompts."""
    model = nnx.merge(graphdef, params)
    batch, seq, hidden = x.shape
    step = POSITIONS_AT_ONCE
    padded = -(-seq // step) * step  # the longest bucket (the model's context) need not be a multiple
    x = jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0)))
    following = jnp.pad(tokens[:, 1:], ((0, 0), (0, padded - seq + 1)))

    def some_positions(args):
        x_part, next_part = args  # [batch, step, hidden], [batch, step]
        logits = model.logits(model.final_norm(x_part.reshape(batch * step, hidden)))  # f32[batch x step, vocab]
        logits = logits.reshape(batch, step, -1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        top, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
        token = jnp.take_along_axis(logprobs, next_part[..., None], axis=-1)  # [batch, step, 1]
        rank = jnp.sum(logprobs >= token, axis=-1, dtype=jnp.int32)  # vLLM's: itself and every tie count
        return token[..., 0], top_ids.astype(jnp.int32), top, rank

    parts = (x.reshape(batch, padded // step, step, hidden).swapaxes(0, 1),
             following.reshape(batch, padded // step, step).swapaxes(0, 1))
    logprob, top_ids, top, rank = jax.lax.map(some_positions, parts)  # [padded // step, batch, step, ...]
    whole = lambda a: a.swapaxes(0, 1).reshape(batch, padded, *a.shape[3:])[:, :seq]  # noqa: E731
    return PromptLogprobs(whole(logprob), whole(top_ids), whole(top), whole(rank))
