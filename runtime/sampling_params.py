"""Sampling parameters of a request: validated on the host, no JAX (the client SDK and the
batch file reader use them). runtime/sampling.py samples with them on the device."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import secrets
from collections.abc import Mapping

from splitserve.runtime.structured_outputs import StructuredOutputs, structured_outputs

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# Each generated token is checked against every stop id, on the decode step's thread: a request
# must not be able to slow every other request's steps with millions of them.
MAX_STOP_TOKEN_IDS = 1024
# While min_tokens holds EOS and the stop ids back, the sampler masks them from a fixed-width
# array per row (runtime/sampling.py): a request with min_tokens may name this many stop ids.
MAX_HELD_BACK_STOP_IDS = 16
# repetition_penalty multiplies and divides float32 logits: kept where neither can reach 0 or inf.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# A request with n > 1 runs as n requests (runtime/parallel_sampling.py), each with its own pages.
MAX_N = 16
# As OpenAI's logit_bias: each bias is in [-100, 100] (enough to ban or force a token).
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGPROBS = 20  # as vLLM's default max_logprobs (and OpenAI's top_logprobs limit)
FLOAT32_MAX = 3.4028234663852886e38  # sampling floats travel as 32-bit floats (protos, device arrays)
INT32_MAX = 2**31 - 1  # token ids, top_k and max_tokens travel as 32-bit integers (protos, device arrays)


def check_text(text: str, what: str) -> None:
    """Raises ValueError unless the text can be encoded (a lone surrogate, e.g. from JSON's "\\ud83d", cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: {e.reason} at character {e.start}") from None


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float (a JSON line may hold one)
        return False


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k; -1 (vLLM's "off") is taken as 0
    # As vLLM's, in [0, 1]: a token can be sampled only if its probability (after temperature) is at
    # least min_p times the most likely token's. 0 = off; greedy requests ignore it.
    min_p: float = 0.0
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # As vLLM's: until this many tokens are out, EOS and stop_token_ids cannot be sampled (their
    # logits are masked) and stop strings are not looked for.
    min_tokens: int = 0
    # None: no log-probabilities. N: each generated token's logprob and the N most likely
    # tokens' (runtime/logprobs.py), as vLLM's `logprobs`.
    logprobs: int | None = None
    # As vLLM's: the text ends with the stop string that ended it, instead of before it.
    include_stop_str_in_output: bool = False
    # As OpenAI's and vLLM's, in [-2, 2]: each logit minus presence_penalty if the token has been
    # generated before and frequency_penalty times the number of times it has (output tokens only).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # As transformers' and vLLM's (1: off; in REPETITION_PENALTY_RANGE): the logit of every token in
    # the prompt or generated before is divided by it where positive and multiplied by it where negative.
    repetition_penalty: float = 1.0
    # As vLLM's: k keeps only the prompt's last k tokens (left truncation); -1 the model's context's
    # worth; None keeps it whole.
    truncate_prompt_tokens: int | None = None
    # As vLLM's and OpenAI's: this many completions of the prompt, sequence i sampled with seed + i.
    n: int = 1
    # As OpenAI's and vLLM's: (token id, bias) pairs added to those tokens' logits before penalties,
    # temperature and sampling (greedy too). A dict is taken; keys may be decimal strings (JSON's).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # As vLLM's: only these ids can be sampled (every other logit is -inf). None: any id.
    allowed_token_ids: tuple[int, ...] | None = None
    # As vLLM's prompt_logprobs: N in [0, MAX_LOGPROBS]: each prompt token's logprob given the tokens
    # before it (all but the first), and the N most likely there. None: not computed.
    prompt_logprobs: int | None = None
    # As vLLM's structured_outputs: the output held to a JSON schema, a regex, a choice or a grammar
    # (runtime/structured_outputs.py). A dict of its fields is taken. None: free text.
    structured_outputs: StructuredOutputs | None = None
    # As vLLM's: the text leaves special tokens out (their ids stay in token_ids). False keeps their
    # text, as tool parsers need for models whose call markers are special tokens.
    skip_special_tokens: bool = True

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "structured_outputs", structured_outputs(self.structured_outputs))
        if self.structured_outputs is not None and (self.ignore_eos or self.min_tokens):
            # Once the grammar is complete only EOS may follow: neither could hold it back.
            raise ValueError("structured outputs cannot be combined with ignore_eos or min_tokens")
        object.__setattr__(self, "logit_bias", bias_pairs(self.logit_bias))
        if self.allowed_token_ids is not None:
            if isinstance(self.allowed_token_ids, (str, bytes)):  # not its characters
                raise ValueError(f"allowed_token_ids must be a list of token ids, got {self.allowed_token_ids!r}")
            object.__setattr__(self, "allowed_token_ids", tuple(token_id(t, "allowed_token_ids")
                                                                for t in self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must name at least one token id (or be unset)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.min_tokens and len(self.stop_token_ids) > MAX_HELD_BACK_STOP_IDS:
            raise ValueError(f"with min_tokens, at most {MAX_HELD_BACK_STOP_IDS} stop_token_ids are allowed "
                             f"(they are masked until min_tokens), got {len(self.stop_token_ids)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # NaN fails too
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        low, high = REPETITION_PENALTY_RANGE
        if not low * (1 - 1e-6) <= self.repetition_penalty <= high:  # NaN fails; 0.01 comes as 0.0099999998 in a proto
            raise ValueError(f"repetition_penalty must be in [{low}, {high:g}] (1 is off), "
                             f"got {self.repetition_penalty}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens == -1
                                                            or 1 <= self.truncate_prompt_tokens <= INT32_MAX):
            raise ValueError(f"truncate_prompt_tokens must be -1 (the model's context) or in [1, {INT32_MAX}], "
                             f"got {self.truncate_prompt_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] (or unset), got {getattr(self, name)}")
        if self.max_tokens > INT32_MAX or self.top_k > INT32_MAX:
            raise ValueError(f"max_tokens and top_k must be at most {INT32_MAX}, got {self.max_tokens} and {self.top_k}")
        if not self.temperature >= 0 or not _finite(self.temperature) or self.temperature > FLOAT32_MAX:
            raise ValueError(f"temperature must be a finite number >= 0 (at most {FLOAT32_MAX:.9g}: it travels as a "
                             f"32-bit float), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(self.stop_token_ids)}")
        if bad := [t for t in self.stop_token_ids if not 0 <= t <= INT32_MAX]:
            raise ValueError(f"stop_token_ids must be in [0, {INT32_MAX}], got {bad[0]}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
            check_text(s, "a stop string")

    def with_seed(self) -> "SamplingParams":
        """Fixes a random seed now, so every leg of a request samples with the same one."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbits(32))

    def child(self, index: int) -> "SamplingParams":
        """Sequence `index` of an n > 1 request, as vLLM's: one sequence, seed + index (the seed fixed first)."""
        assert self.seed is not None, "fix the seed (with_seed) before deriving the sequences"
        return dataclasses.replace(self, n=1, seed=(self.seed + index) % 2**32)

    def truncated(self, prompt_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt as the model will read it: its last truncate_prompt_tokens tokens, if set."""
        keep = max_model_len if self.truncate_prompt_tokens == -1 else self.truncate_prompt_tokens
        return list(prompt_ids) if keep is None else list(prompt_ids)[-keep:]

    @property
    def penalised(self) -> bool:
        """Whether the sampler needs the request's token counts (runtime/penalty_rows.py)."""
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def biased(self) -> bool:
        """Whether the sampler needs the request's logit bias row (logit_bias or allowed_token_ids)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None

    def bias_ids(self) -> list[int]:
        """Every token id named by logit_bias and allowed_token_ids (checked against a vocabulary)."""
        return [t for t, _ in self.logit_bias] + list(self.allowed_token_ids or ())


def token_id(value, what: str, decimal_string: bool = False) -> int:
    """A token id from an integer (numpy's too) or, with `decimal_string`, a string of ASCII digits
    (JSON object keys are strings), in [0, INT32_MAX]."""
    if decimal_string and isinstance(value, str) and value.isascii() and value.isdigit():
        token = int(value)
    else:
        try:
            if isinstance(value, bool):
                raise TypeError
            token = operator.index(value)  # ints, numpy ints; not floats or strings
        except TypeError:
            raise ValueError(f"{what} token ids must be integers, got {value!r}") from None
    if not 0 <= token <= INT32_MAX:
        raise ValueError(f"{what} token ids must be in [0, {INT32_MAX}], got {token}")
    return token


def bias_pairs(logit_bias) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (id, bias) pairs, from a dict (None: empty, as OpenAI's null) or pairs;
    each bias a number in LOGIT_BIAS_RANGE."""
    if logit_bias is None:
        return ()
    items = logit_bias.items() if isinstance(logit_bias, Mapping) else logit_bias
    try:
        items = [(token, bias) for token, bias in items]
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must map token ids to biases, got {logit_bias!r:.80}") from None
    pairs = {}
    low, high = LOGIT_BIAS_RANGE
    for token, bias in items:
        token = token_id(token, "logit_bias", decimal_string=True)
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
            raise ValueError(f"logit_bias values must be numbers, got {bias!r} for {token}")
        if not low <= bias <= high:  # NaN fails too
            raise ValueError(f"logit_bias values must be in [{low:g}, {high:g}], got {bias!r} for {token}")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))
