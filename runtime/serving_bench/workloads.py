"""Benchmark workloads: what each request sends and how many tokens it asks for.

- random:   prompts of random token ids (never an EOS id), lengths spread as vLLM's
            `--random-range-ratio`: uniform integers in [L*(1-r), L*(1+r)] for input and output.
- sharegpt: a ShareGPT JSON file; prompt = the first human turn (text), output length = the
            tokens of the first gpt reply after it (capped); pairs filtered as vLLM does.
- mixed:    short chats with occasional long prompts: n * long_fraction requests, rounded half
            up and at least one when the fraction is > 0 (so a short warm-up compiles the long
            shapes too), are "long" (at random positions), the rest "short"; each class has its own input and
            output length, spread by the same range ratio. Defaults: 10% long; short 128 in /
            128 out; long 7/8 of the model's context in (1792 on the demo model; lowered when a
            range ratio would spread it past the context) / 32 out.

Every request is sent with ignore_eos, so it produces exactly its output length.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

# vLLM's ShareGPT filter: pairs with a prompt or reply under 4 tokens, a prompt over 1024
# tokens, or prompt + reply over the context (vLLM: 2048) are skipped.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant", "chatgpt")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_len: int
    output_len: int
    kind: str  # "random", "sharegpt", "short" or "long"
    token_ids: tuple[int, ...] | None = None  # exactly one of token_ids and text
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class MixedSpec:
    long_fraction: float = 0.1
    short_input_len: int = 128
    short_output_len: int = 128
    long_input_len: int | None = None  # None: 7/8 of max_model_len
    long_output_len: int = 32

    def __post_init__(self):
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"--mixed-long-fraction must be in [0, 1], got {self.long_fraction}")
        _check_lengths(mixed_short_input_len=self.short_input_len, mixed_short_output_len=self.short_output_len,
                       mixed_long_input_len=self.long_input_len, mixed_long_output_len=self.long_output_len)

    def num_long(self, n: int) -> int:
        if self.long_fraction == 0.0:
            return 0
        return min(n, max(1, math.floor(n * self.long_fraction + 0.5)))


def _check_lengths(**lengths: int | None) -> None:
    """Token counts given as flags must be >= 1 (None: not given)."""
    for name, value in lengths.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def spread_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    """n integers uniform in [floor(mean*(1-r)), ceil(mean*(1+r))], at least 1 (vLLM's spread)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if mean < 1:
        raise ValueError(f"lengths must be >= 1, got {mean}")
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_token_ids(rng: np.random.Generator, length: int, vocab_size: int,
                     eos_token_ids: list[int]) -> tuple[int, ...]:
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(eos_token_ids, dtype=np.int64))
    return tuple(int(t) for t in allowed[rng.integers(0, len(allowed), size=length)])


def _check_fits(input_lens: np.ndarray, output_lens: np.ndarray, max_model_len: int, what: str) -> None:
    longest = int((input_lens + output_lens).max(initial=0))
    if longest > max_model_len:
        raise ValueError(f"{what}: input + output reaches {longest} tokens, over the model's context of "
                         f"{max_model_len}; lower the lengths or the range ratio")


def random_requests(n: int, rng: np.random.Generator, *, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, eos_token_ids: list[int], max_model_len: int,
                    kind: str = "random", prefix_len: int = 0) -> list[BenchRequest]:
    """`prefix_len`: tokens every prompt starts with (vLLM's --random-prefix-len), before its own
    `input_len` (spread); one random prefix per workload."""
    prefix = random_token_ids(rng, prefix_len, vocab_size, eos_token_ids)
    input_lens = spread_lengths(rng, input_len, range_ratio, n)
    output_lens = spread_lengths(rng, output_len, range_ratio, n)
    _check_fits(input_lens + prefix_len, output_lens, max_model_len, f"{kind} requests")
    return [BenchRequest(prefix_len + int(i), int(o), kind,
                         token_ids=prefix + random_token_ids(rng, int(i), vocab_size, eos_token_ids))
            for i, o in zip(input_lens, output_lens)]


def default_long_input_len(max_model_len: int, output_len: int, range_ratio: float) -> int:
    """7/8 of the context, lowered so the longest spread prompt plus its output still fits."""
    longest_output = math.ceil(output_len * (1 + range_ratio))
    return min(max_model_len * 7 // 8, math.floor((max_model_len - longest_output) / (1 + range_ratio)))


def mixed_requests(n: int, rng: np.random.Generator, spec: MixedSpec, *, range_ratio: float, vocab_size: int,
                   eos_token_ids: list[int], max_model_len: int) -> list[BenchRequest]:
    num_long = spec.num_long(n)
    long_input = (spec.long_input_len if spec.long_input_len is not None
                  else default_long_input_len(max_model_len, spec.long_output_len, range_ratio))
    common = dict(range_ratio=range_ratio, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                  max_model_len=max_model_len)
    longs = random_requests(num_long, rng, input_len=long_input, output_len=spec.long_output_len, kind="long",
                            **common)
    shorts = random_requests(n - num_long, rng, input_len=spec.short_input_len,
                             output_len=spec.short_output_len, kind="short", **common)
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.permutation(n)[:num_long]] = True
    longs_iter, shorts_iter = iter(longs), iter(shorts)
    return [next(longs_iter) if flag else next(shorts_iter) for flag in is_long]


def sharegpt_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, first gpt reply after it) of every conversation that has both; entries
    of another shape (turns that are not objects, values that are not text) are skipped."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}}")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        turns = [t for t in turns if isinstance(t, dict)]
        human = next((i for i, t in enumerate(turns) if t.get("from") in HUMAN_ROLES), None)
        if human is None:
            continue
        reply = next((t for t in turns[human + 1:] if t.get("from") in GPT_ROLES), None)
        if reply is not None and isinstance(turns[human].get("value"), str) and isinstance(reply.get("value"), str):
            pairs.append((turns[human]["value"], reply["value"]))
    return pairs


def sharegpt_requests(n: int, rng: np.random.Generator, path: str | Path, tokenizer, *, max_model_len: int,
                      output_len: int | None = None, max_output_len: int | None = None) -> list[BenchRequest]:
    """n requests from shuffled ShareGPT pairs; repeats them (in the same order) when fewer pass the filter.

    output_len fixes every request's output length (vLLM's --sharegpt-output-len); otherwise it is
    the reply's token count, capped at max_output_len.
    """
    pairs = sharegpt_pairs(path)
    chosen: list[BenchRequest] = []
    for index in rng.permutation(len(pairs)):
        if len(chosen) == n:
            break
        prompt, reply = pairs[index]
        prompt_len = len(tokenizer.encode(prompt))
        out_len = output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        if max_output_len is not None and output_len is None:
            out_len = min(out_len, max_output_len)
        too_short = prompt_len < SHAREGPT_MIN_LEN or (output_len is None and out_len < SHAREGPT_MIN_LEN)
        too_long = prompt_len > min(SHAREGPT_MAX_PROMPT_LEN, max_model_len) or prompt_len + out_len > max_model_len
        if not (too_short or too_long):
            chosen.append(BenchRequest(prompt_len, out_len, "sharegpt", text=prompt))
    if not chosen:
        raise ValueError(f"{path}: no conversation passes the filter (prompt and reply >= {SHAREGPT_MIN_LEN} "
                         f"tokens, prompt <= {SHAREGPT_MAX_PROMPT_LEN}, total <= {max_model_len})")
    return [chosen[i % len(chosen)] for i in range(n)]


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    dataset: str = "random"  # "random" | "sharegpt" | "mixed"
    num_prompts: int = 100
    random_input_len: int = 1024
    random_output_len: int = 128
    random_prefix_len: int = 0  # random: tokens every prompt starts with (a shared system prompt)
    range_ratio: float = 0.0
    dataset_path: str | None = None
    sharegpt_output_len: int | None = None
    sharegpt_max_output_len: int | None = 256
    mixed: MixedSpec = MixedSpec()
    tokenizer: str = "demo"  # sharegpt only: HF directory or 'demo'

    def __post_init__(self):
        if self.dataset not in ("random", "sharegpt", "mixed"):
            raise ValueError(f"--dataset must be random, sharegpt or mixed, got {self.dataset!r}")
        if self.dataset == "sharegpt" and not self.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE (ShareGPT-format JSON)")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.random_prefix_len < 0:
            raise ValueError(f"--random-prefix-len must be >= 0, got {self.random_prefix_len}")
        if self.random_prefix_len and self.dataset != "random":
            raise ValueError(f"--random-prefix-len applies to --dataset random, not {self.dataset}")
        _check_lengths(random_input_len=self.random_input_len, random_output_len=self.random_output_len,
                       sharegpt_output_len=self.sharegpt_output_len,
                       sharegpt_max_output_len=self.sharegpt_max_output_len)


def build_workload(spec: WorkloadSpec, *, seed: int, vocab_size: int, eos_token_ids: list[int],
                   max_model_len: int, num_prompts: int | None = None) -> list[BenchRequest]:
    """The same spec, seed and model always give the same requests (so two stacks get one workload)."""
    n = spec.num_prompts if num_prompts is None else num_prompts
    rng = np.random.default_rng(seed)
    if spec.dataset == "sharegpt":
        from splitserve.models.metadata import load_metadata

        tokenizer = load_metadata(spec.tokenizer).tokenizer
        if tokenizer is None:
            raise ValueError(f"--tokenizer {spec.tokenizer!r} has no tokenizer.json")
        return sharegpt_requests(n, rng, spec.dataset_path, tokenizer, max_model_len=max_model_len,
                                 output_len=spec.sharegpt_output_len, max_output_len=spec.sharegpt_max_output_len)
    common = dict(range_ratio=spec.range_ratio, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                  max_model_len=max_model_len)
    if spec.dataset == "mixed":
        return mixed_requests(n, rng, spec.mixed, **common)
    return random_requests(n, rng, input_len=spec.random_input_len, output_len=spec.random_output_len,
                           prefix_len=spec.random_prefix_len, **common)
