"""A request's state as it moves through a scheduler, and the results handed to users."""

from __future__ import annotations

import dataclasses
import enum
import time

from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled


def check_prompt_ids(prompt_ids: list[int], vocab_size: int, may_be_empty: bool = False) -> None:
    """Raises ValueError for an empty prompt (unless allowed) or ids the model has no embedding for."""
    if not prompt_ids and not may_be_empty:
        raise ValueError("prompt is empty: at least one token is needed")
    if bad := [t for t in prompt_ids if not 0 <= t < vocab_size]:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def check_bias_ids(params: SamplingParams, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
    """Raises ValueError if logit_bias or allowed_token_ids name an id the model does not have (as
    vLLM), or if min_tokens would hold back every allowed id (nothing could be sampled)."""
    if bad := [t for t in params.bias_ids() if not t < vocab_size]:
        raise ValueError(f"logit_bias / allowed_token_ids name token ids {bad[:5]} outside the vocabulary "
                         f"[0, {vocab_size})")
    held_back = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    if params.min_tokens and params.allowed_token_ids is not None and set(params.allowed_token_ids) <= held_back:
        raise ValueError("with min_tokens, allowed_token_ids must name a token other than EOS and stop_token_ids "
                         "(those are held back until min_tokens)")


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrival_s: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_s: float | None = None
    output_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # when params.logprobs is set
    prompt_logprobs: list[TokenLogprobs] | None = None  # from the prefill, when params.prompt_logprobs is set
    cached_prompt_tokens: int = 0  # from the prefill: prompt tokens found in the prefix cache
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V are (or are about to be) in the cache, plus the newest one."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request."""

    request_id: str
    token_id: int
    text_delta: str
    finish_reason: FinishReason | None
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    error: str | None = None  # why it stopped unfinished (ABORT; its structured output failed); no token then


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    ttft_s: float
    latency_s: float
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked for them
    # As vLLM's: the stop string or stop token id that ended it; None when EOS or max_tokens did.
    stop_reason: str | int | None = None
    # One per prompt token after the first, when the request asked (runtime/prompt_logprobs.py).
    prompt_logprobs: list[TokenLogprobs] | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from a prefix cache (runtime/prefix_cache.py)

    def to_json_dict(self) -> dict:
        """The fields as JSON values; "logprobs" and "prompt_logprobs" only when the request asked
        for them, "stop_reason" only when a stop string or stop token id ended it, "cached_prompt_tokens"
        only when a prefix cache gave some."""
        optional = ("logprobs", "stop_reason", "prompt_logprobs", "cached_prompt_tokens")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in optional}
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                d[name] = [lp.to_json_dict() for lp in getattr(self, name)]
        if self.stop_reason is not None:
            d["stop_reason"] = self.stop_reason
        if self.cached_prompt_tokens:
            d["cached_prompt_tokens"] = self.cached_prompt_tokens
        return d
