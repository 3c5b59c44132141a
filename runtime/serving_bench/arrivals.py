"""When each request is sent: offsets in seconds from the start of the run, as vLLM draws them.

Gaps between arrivals are gamma-distributed with shape = burstiness and scale =
1 / (rate * burstiness): the mean gap is 1/rate whatever the burstiness, and the
coefficient of variation is 1/sqrt(burstiness). Burstiness 1 is a Poisson process
(exponential gaps); below 1 arrivals come in bursts, above 1 they are more even.
The first request goes at 0; request i waits for the sum of the first i gaps.
A rate of inf sends everything at once.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    if not request_rate > 0:  # NaN too: its gaps would be NaN, and NaN sleeps are no sleeps
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):  # inf: gamma(inf, 0) gaps are NaN
        raise ValueError(f"--burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(request_rate) or n == 0:
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def parse_rates(text: str) -> list[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0]; 'inf' -> [inf]."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--request-rate {text!r} is not a comma-separated list of numbers or 'inf'") from None
    if not rates or any(not r > 0 for r in rates):  # `not r > 0` refuses NaN too
        raise ValueError(f"--request-rate {text!r}: every rate must be > 0 (or inf)")
    return rates
