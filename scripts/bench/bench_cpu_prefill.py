"""One prompt's prefill on the CPU: prefill attention by the reference against `impl="xla"`, whole
and in chunks, in one process.

    python scripts/bench/bench_cpu_prefill.py [--model demo] [--lengths 100,600,1900] [--chunk 256]
                                              [--reps 5] [--json-out F]

The model's prefill attention on a CPU is `impl="xla"` (pallas_kernels/flash_xla.py: 128 queries
at a time, causal blocks cut to the keys before them); "reference" builds every score at once.
Each variant prefills the same prompt (first token on the host, every layer's K/V ready), the
variants taking turns rep by rep so drift hits all alike; two untimed runs each compile first.
Medians in ms, and each variant's ratio to the reference's whole prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def prefill_once(runner, prompt, params) -> None:
    import jax

    if runner.chunked is not None and runner.chunked.wants(prompt, params):
        steps = runner.chunked.run(prompt, params, 0)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                first, ks, _, _ = done.value
                break
    else:
        first, ks, _, _ = runner.prefill_async([prompt], [params], [0])
    first.to_host([params])
    jax.block_until_ready(ks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--lengths", default="100,600,1900", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--chunk", type=int, default=256, help="--prefill-chunk-tokens of the chunked variants")
    parser.add_argument("--reps", type=int, default=5, help="timed prefills per length and variant")
    parser.add_argument("--json-out", help="write the results here")
    args = parser.parse_args(argv)
    if args.chunk < 1 or args.reps < 1:
        parser.error("--chunk and --reps must be >= 1")
    lengths = [int(x) for x in args.lengths.split(",")]

    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh
    from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
    from splitserve.runtime.sampling_params import SamplingParams

    model = load_model(args.model, make_mesh(MeshConfig(1)))
    if max(lengths) > model.config.max_model_len:
        parser.error(f"--lengths: the model's context is {model.config.max_model_len} tokens")
    variants = {f"{impl}{' chunked' if chunk else ''}": ModelRunner(model, RunnerConfig(
        num_pages=2, decodes=False, attention_impl=impl, prefill_chunk_tokens=chunk))
        for impl in ("reference", "xla") for chunk in (0, args.chunk)}
    params = SamplingParams(max_tokens=1)
    rng = np.random.default_rng(0)
    times = {n: {name: [] for name in variants} for n in lengths}
    for n in lengths:
        prompt = [int(t) for t in rng.integers(3, model.config.vocab_size, size=n)]
        for rep in range(args.reps + 2):
            for name, runner in variants.items():
                start = time.perf_counter()
                prefill_once(runner, prompt, params)
                if rep >= 2:
                    times[n][name].append(time.perf_counter() - start)

    print(f"load average {os.getloadavg()[0]:.1f}; {args.model}; chunks of {args.chunk}; median ms of {args.reps} "
          "(ratio to the reference's whole prefill)")
    print(f"{'prompt':>8}" + "".join(f"{name:>24}" for name in variants))
    rows = []
    for n in lengths:
        medians = {name: statistics.median(t) * 1e3 for name, t in times[n].items()}
        base = medians["reference"]
        print(f"{n:>8}" + "".join(f"{m:>15.1f} ({m / base:4.2f}x)" for m in medians.values()))
        rows.append({"prompt_tokens": n, "median_ms": medians, "times_s": times[n]})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "chunk": args.chunk, "load_average": os.getloadavg()[0], "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
