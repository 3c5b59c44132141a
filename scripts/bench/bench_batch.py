"""Batch inference throughput: the continuously-batched batch runner vs one request at a time.

    python scripts/bench/bench_batch.py [--requests 64] [--max-tokens 32] [--max-batch 16 32]
                                        [--json-out scripts/bench/results/batch_demo.json]

In one process on the demo model (in-process, CPU by default), the same N greedy requests
(random token-id prompts of 32-128 tokens, `max_tokens` each, ignore_eos) run:
  (a) through `run_batch` + InProcessBackend: one ColocatedEngine, continuous batching,
      results appended to a JSONL file, as `scripts/batch_infer.py --model` does;
  (b) one at a time, as `splitserve generate` does: a max_batch=1 ColocatedEngine and
      `generate_stream` per request.
Each configuration runs once untimed (compiles every shape it will use), then once timed.
Outputs of (a) are checked equal to (b). Reports requests/s, output tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="number of requests (default 64)")
    parser.add_argument("--min-prompt", type=int, default=32, help="shortest prompt in tokens (default 32)")
    parser.add_argument("--max-prompt", type=int, default=128, help="longest prompt in tokens (default 128)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[16, 32], help="batch engine sizes to try")
    parser.add_argument("--platform", default="cpu", help="JAX platform (default cpu)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1)) - 1).tolist() for _ in range(n)]


def run_batched(model, prompts, max_tokens: int, max_batch: int, workdir: Path) -> tuple[float, dict]:
    from splitserve.runtime.batch_runner import InProcessBackend, run_batch
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": max_tokens, "ignore_eos": True})
                           + "\n" for i, p in enumerate(prompts)))
    engine = ColocatedEngine(model, EngineConfig(max_batch=max_batch, max_prefill_batch=min(8, max_batch)))
    timings = []
    for attempt in ("warm-up", "timed"):
        out = workdir / f"out-{max_batch}-{attempt}.jsonl"
        start = time.perf_counter()
        run_batch(src, out, InProcessBackend(engine), progress=False)
        timings.append(time.perf_counter() - start)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return timings[-1], {r["id"]: r["token_ids"] for r in records}


def run_one_at_a_time(model, prompts, max_tokens: int) -> tuple[float, dict]:
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
    from splitserve.runtime.in_process import generate_stream
    from splitserve.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    pages = 2 + -(-(max(len(p) for p in prompts) + max_tokens) // 16)
    engine = ColocatedEngine(model, EngineConfig(num_pages=pages, max_batch=1, max_prefill_batch=1))
    timings = []
    for _ in ("warm-up", "timed"):
        outputs = {}
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            *_, (_, completion) = generate_stream(engine, prompt, params)
            outputs[i] = completion.token_ids
        timings.append(time.perf_counter() - start)
    return timings[-1], outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", args.platform)
    import jax

    from splitserve.models.sharding import MeshConfig
    from splitserve.runtime.in_process import load_for_serving

    model = load_for_serving("demo", MeshConfig(1))
    prompts = make_requests(args.requests, args.min_prompt, args.max_prompt, model.config.vocab_size)
    tokens = args.requests * args.max_tokens
    single_s, single_out = run_one_at_a_time(model, prompts, args.max_tokens)
    rows = [dict(mode="one at a time (max_batch 1)", wall_s=single_s)]
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in args.max_batch:
            batch_s, batch_out = run_batched(model, prompts, args.max_tokens, max_batch, Path(tmp))
            if batch_out != single_out:
                bad = [i for i in single_out if batch_out.get(i) != single_out[i]]
                raise SystemExit(f"batch outputs differ from one-at-a-time for requests {bad[:10]}")
            rows.append(dict(mode=f"batch runner (max_batch {max_batch})", wall_s=batch_s))
    for row in rows:
        row.update(requests_per_s=args.requests / row["wall_s"], tokens_per_s=tokens / row["wall_s"],
                   ratio=single_s / row["wall_s"])
    print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.max_tokens} output tokens each, greedy; outputs equal across modes")
    print("| mode | wall s | requests/s | output tokens/s | vs one at a time |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['wall_s']:.2f} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} "
              f"| {row['ratio']:.2f}x |")
    if args.json_out:
        result = dict(config=vars(args), rows=rows, outputs_equal=True, date=time.strftime("%Y-%m-%d"),
                      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg(),
                                   jax=jax.__version__, backend=jax.default_backend()))
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
