"""The interference metric that disaggregation exists to remove, from per-request timestamps.

Definitions (times as the client sees them; see metrics.RequestRecord):
    prefill window of a long request L   W_L = [L.start_s, L.first_token_s]
        from sending L to its first token: L waiting for and running its prefill.
    decode window of a short request S   D_S = [S.first_token_s, S.end_s]
        from S's first token to the end of its stream: S is decoding.
    S is a victim when D_S overlaps some W_L by a positive time:
        max(D_S.start, W_L.start) < min(D_S.end, W_L.end).
Metrics (only successful requests; shorts with >= 2 output tokens, so TPOT is defined):
    interference TPOT   TPOT of every victim -> mean, median, p50/p90/p99 ("p99_interference_tpot_ms").
                        The headline: TPOT p99 of running decodes while long prompts arrive.
    interference ITL    every inter-token gap (c_k, c_{k+1}) of a short request that itself
                        overlaps some W_L: the stalls a prefill puts into a running stream.
    quiet TPOT          TPOT of the shorts that overlap no W_L, the same run's control.
Colocated, a long prefill runs on the same mesh as the decodes and stalls them; disaggregated,
it runs on another mesh, so victims should look like the quiet ones.
"""

from __future__ import annotations

from splitserve.runtime.serving_bench.metrics import RequestRecord, describe


def _overlaps(a0: float, a1: float, windows: list[tuple[float, float]]) -> bool:
    return any(max(a0, w0) < min(a1, w1) for w0, w1 in windows)


def prefill_windows(records: list[RequestRecord], kind: str = "long") -> list[tuple[float, float]]:
    return [(r.start_s, r.first_token_s) for r in records if r.kind == kind and r.success]


def interference(records: list[RequestRecord], victim_kind: str = "short", long_kind: str = "long") -> dict:
    windows = prefill_windows(records, long_kind)
    shorts = [r for r in records if r.kind == victim_kind and r.success and r.tpot_s is not None]
    hit = [_overlaps(r.first_token_s, r.end_s, windows) for r in shorts]
    victims = [r for r, h in zip(shorts, hit) if h]
    quiet = [r for r, h in zip(shorts, hit) if not h]
    gaps = [b - a for r in victims for a, b in zip(r.chunk_s, r.chunk_s[1:]) if _overlaps(a, b, windows)]
    result = dict(long_prefills=len(windows), victims=len(victims), quiet=len(quiet), victim_gaps=len(gaps))
    result |= describe("interference_tpot", [r.tpot_s for r in victims])
    result |= describe("interference_itl", gaps)
    result |= describe("quiet_tpot", [r.tpot_s for r in quiet])
    return result
