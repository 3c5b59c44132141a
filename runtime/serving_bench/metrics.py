"""Per-request timings and the run's summary, with `vllm bench serve`'s definitions.

For a request sent at start_s whose token-carrying chunks arrive at c_0 < c_1 < ... and whose
stream ends at end_s, with n output tokens:
    TTFT = c_0 - start_s
    E2EL = end_s - start_s                       (end-to-end latency)
    TPOT = (E2EL - TTFT) / (n - 1)               only for n >= 2
    ITL  = c_{k+1} - c_k for every k             (all gaps, pooled over requests)
Summary statistics are mean, median, std and percentiles (numpy's linear interpolation)
in milliseconds; throughputs divide by the run's wall time. Only successful requests count.
Goodput = successful requests per second that meet every SLO given; as in vLLM, a request
with fewer than 2 tokens has TPOT 0 for this purpose. Keys follow vLLM's result JSON
(e.g. "p99_tpot_ms", "request_goodput").
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class RequestRecord:
    """One request's timeline; every time is in seconds from the start of the run."""

    index: int
    kind: str
    prompt_len: int
    output_len: int  # asked for
    scheduled_s: float  # planned arrival
    start_s: float = 0.0  # sent (once the concurrency limit let it go)
    chunk_s: list[float] = dataclasses.field(default_factory=list)  # arrival of each chunk with tokens
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)
    end_s: float = 0.0
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error and bool(self.chunk_s)

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def first_token_s(self) -> float | None:
        return self.chunk_s[0] if self.chunk_s else None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] - self.start_s if self.chunk_s else None

    @property
    def e2el_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        return (self.e2el_s - self.ttft_s) / (n - 1) if self.chunk_s and n >= 2 else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    def to_json(self) -> dict:
        """Times rounded to the microsecond."""
        ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
        us = lambda s: round(s, 6)  # noqa: E731
        return dict(index=self.index, kind=self.kind, success=self.success, error=self.error,
                    prompt_len=self.prompt_len, output_len=self.output_len, output_tokens=self.output_tokens,
                    scheduled_s=us(self.scheduled_s), start_s=us(self.start_s), end_s=us(self.end_s),
                    ttft_ms=ms(self.ttft_s), tpot_ms=ms(self.tpot_s), e2el_ms=ms(self.e2el_s),
                    itl_ms=[ms(g) for g in self.itl_s], chunk_s=[us(t) for t in self.chunk_s],
                    chunk_tokens=self.chunk_tokens)

    @classmethod
    def from_json(cls, d: dict) -> "RequestRecord":
        return cls(d["index"], d["kind"], d["prompt_len"], d["output_len"], d["scheduled_s"], d["start_s"],
                   list(d["chunk_s"]), list(d["chunk_tokens"]), d["end_s"], d["error"])


def describe(name: str, values_s: list[float]) -> dict[str, float | None]:
    """{"mean_NAME_ms", "median_NAME_ms", "std_NAME_ms", "p50_NAME_ms", ...}; None when there are no values."""
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats: dict[str, float | None] = {}
    for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
        stats[f"{stat}_{name}_ms"] = float(fn(ms)) if ms.size else None
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else None
    return stats


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """vLLM's --goodput syntax: ["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not (slos[key] >= 0 and math.isfinite(slos[key])):
            raise ValueError(f"--goodput {item!r}: an SLO must be a finite number >= 0 ms")
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    values_ms = dict(ttft=record.ttft_s * 1e3, tpot=(record.tpot_s or 0.0) * 1e3, e2el=record.e2el_s * 1e3)
    return all(values_ms[key] <= limit for key, limit in slos.items())


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    summary = dict(
        completed=len(ok), failed=len(records) - len(ok), duration=duration_s,
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s, output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        request_goodput=(sum(meets_slos(r, slos) for r in ok) / duration_s) if slos else None,
    )
    summary |= describe("ttft", [r.ttft_s for r in ok])
    summary |= describe("tpot", [r.tpot_s for r in ok if r.tpot_s is not None])
    summary |= describe("itl", [gap for r in ok for gap in r.itl_s])
    summary |= describe("e2el", [r.e2el_s for r in ok])
    return summary
