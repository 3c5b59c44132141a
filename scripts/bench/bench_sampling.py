"""On-device sampling cost per decode step, by sampling mode, side by side in one run.

    python scripts/bench/bench_sampling.py [--batches 8,64] [--vocabs 32000,128256] [--reps 20]
                                           [--json-out scripts/bench/results/sampling_cpu.json]

For each batch size and vocabulary size, the jitted `runtime.sampling.sample` (what every prefill
and decode step runs after the model) is timed on random logits for each mode, every row of the
batch in that mode, and reported as the median milliseconds per step and the ratio to greedy in
the same run. `temperature` alone only draws; `top_p`, `top_k` and `min_p` also search for their
cutoff (runtime/sampling_cutoff.py), so their ratio to `temperature` is what the search costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from splitserve.runtime.sampling import SamplingArrays, bias_vector, sample
from splitserve.runtime.sampling_params import SamplingParams

# mode -> the sampling parameters every row of the batch uses (seeds differ per row)
MODES = {
    "greedy": SamplingParams(),
    "temperature": SamplingParams(temperature=0.8),
    "top_p": SamplingParams(temperature=0.8, top_p=0.9),
    "top_k": SamplingParams(temperature=0.8, top_k=50),
    "min_p": SamplingParams(temperature=0.8, min_p=0.05),
    "logit_bias": SamplingParams(logit_bias={7: -100.0, 11: 2.0}),
    "penalties": SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
}


@dataclasses.dataclass(frozen=True)
class Figure:
    batch: int
    vocab: int
    mode: str
    step_ms: float  # median over reps
    step_ms_min: float
    vs_greedy: float  # step_ms / greedy's step_ms, same batch and vocab, same run


def time_mode(params: SamplingParams, batch: int, vocab: int, reps: int, rng: np.random.Generator) -> list[float]:
    """Seconds per call of the jitted sampler for a batch whose rows all use `params`."""
    rows = [dataclasses.replace(params, seed=i) for i in range(batch)]
    arrays = SamplingArrays.build(rows, [5] * batch, batch, penalty_rows=list(range(batch)),
                                  bias_rows=list(range(batch)))
    logits = jnp.asarray(rng.normal(size=(batch, vocab)) * 3.0, jnp.float32)
    counts = jnp.asarray(rng.integers(0, 3, size=(batch, vocab)), jnp.int32)  # some ids seen, some twice
    bias = jnp.asarray(np.stack([bias_vector(p, vocab) for p in rows]))
    step = jax.jit(lambda x, s, c, b: sample(x, s, c, bias=b).tokens)
    step(logits, arrays, counts, bias).block_until_ready()  # compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(logits, arrays, counts, bias).block_until_ready()
        times.append(time.perf_counter() - start)
    return times


def run(batches: list[int], vocabs: list[int], reps: int) -> list[Figure]:
    rng = np.random.default_rng(0)
    figures = []
    for vocab in vocabs:
        for batch in batches:
            medians = {}
            for mode, params in MODES.items():
                times = time_mode(params, batch, vocab, reps, rng)
                medians[mode] = (statistics.median(times), min(times))
            for mode, (median, fastest) in medians.items():
                figures.append(Figure(batch, vocab, mode, median * 1e3, fastest * 1e3, median / medians["greedy"][0]))
    return figures


def table(figures: list[Figure]) -> str:
    lines = ["| vocab | batch | mode | ms / step (median) | min | vs greedy |", "|---|---|---|---|---|---|"]
    lines += [f"| {f.vocab} | {f.batch} | {f.mode} | {f.step_ms:.3f} | {f.step_ms_min:.3f} | {f.vs_greedy:.2f}x |"
              for f in figures]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=_ints, default=[8, 64], help="comma-separated batch sizes (default 8,64)")
    p.add_argument("--vocabs", type=_ints, default=[32000, 128256],
                   help="comma-separated vocabulary sizes (default 32000,128256: Llama 2 and Llama 3)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per mode (default 20)")
    p.add_argument("--json-out", type=Path, help="also write the figures here as JSON")
    args = p.parse_args(argv)
    figures = run(args.batches, args.vocabs, args.reps)
    device = jax.devices()[0]
    print(f"sampling on {device.platform} ({device.device_kind}), JAX {jax.__version__}, {args.reps} reps per mode")
    print(table(figures))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"device": f"{device.platform} {device.device_kind}",
                                             "jax": jax.__version__, "reps": args.reps,
                                             "figures": [dataclasses.asdict(f) for f in figures]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
