"""Batch inference throughput: the continuously-batched batch runner vs one request at a time.

    python scripts/bench/bench_batch.py [--requests 64] [--max-tokens 32] [--max-batch 16 32]
                                        [--json-out scripts/bench/results/batch_demo.json]

In one process on the demo model (in-process, CPU by default), the same N greedy requests
(random token-id prompts of 32-128 tokens, `max_tokens` each, ignore_eos) run:
  (a) through `run_batch` + InProcessBackend: one ColocatedEngine, continuous batching,
      results appended to a JSONL file, as `scripts/batch_infer.py --model` does;
  (b) one at a time, as `splitserve generate` does: a max_batch=1 ColocatedEngine and
      `generate_stream` per request.
Each mode runs once untimed (compiles every shape it will use; outputs of (a) are checked
equal to (b)), then `--rounds` timed rounds that interleave the modes, so load from elsewhere
hits them alike. Reports the median wall time, requests/s, output tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, modes interleaved; medians reported")
    parser.add_argument("--platform", default="cpu", help="JAX platform (default cpu)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1)) - 1).tolist() for _ in range(n)]


class BatchedMode:
    """`run_batch` + InProcessBackend on one ColocatedEngine, as `scripts/batch_infer.py --model` does."""

    def __init__(self, model, prompts, max_tokens: int, max_batch: int, workdir: Path):
        from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

        self.name = f"batch runner (max_batch {max_batch})"
        self.workdir, self.runs = workdir, 0
        self.src = workdir / f"in-{max_batch}.jsonl"
        self.src.write_text("".join(json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": max_tokens,
                                                "ignore_eos": True}) + "\n" for i, p in enumerate(prompts)))
        self.engine = ColocatedEngine(model, EngineConfig(max_batch=max_batch, max_prefill_batch=min(8, max_batch)))

    def __call__(self) -> tuple[float, dict]:
        from splitserve.runtime.batch_runner import InProcessBackend, run_batch

        self.runs += 1
        out = self.workdir / f"out-{self.name.split()[-1][:-1]}-{self.runs}.jsonl"
        start = time.perf_counter()
        run_batch(self.src, out, InProcessBackend(self.engine), progress=False)
        elapsed = time.perf_counter() - start
        records = [json.loads(line) for line in out.read_text().splitlines()]
        return elapsed, {r["id"]: r["token_ids"] for r in records}


class OneAtATimeMode:
    """What `splitserve generate` does per request: a max_batch=1 ColocatedEngine, `generate_stream`."""

    name = "one at a time (max_batch 1)"

    def __init__(self, model, prompts, max_tokens: int):
        from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
        from splitserve.runtime.sampling_params import SamplingParams

        self.prompts = prompts
        self.params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        pages = 2 + -(-(max(len(p) for p in prompts) + max_tokens) // 16)
        self.engine = ColocatedEngine(model, EngineConfig(num_pages=pages, max_batch=1, max_prefill_batch=1))

    def __call__(self) -> tuple[float, dict]:
        from splitserve.runtime.in_process import generate_stream

        outputs = {}
        start = time.perf_counter()
        for i, prompt in enumerate(self.prompts):
            *_, (_, completion) = generate_stream(self.engine, prompt, self.params)
            outputs[i] = completion.token_ids
        return time.perf_counter() - start, outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    from splitserve.runtime.platform_setup import jax_platforms

    os.environ.setdefault("JAX_PLATFORMS", jax_platforms(args.platform))
    import jax

    from splitserve.models.sharding import MeshConfig
    from splitserve.runtime.in_process import load_for_serving

    model = load_for_serving("demo", MeshConfig(1))
    prompts = make_requests(args.requests, args.min_prompt, args.max_prompt, model.config.vocab_size)
    tokens = args.requests * args.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        modes = [OneAtATimeMode(model, prompts, args.max_tokens)]
        modes += [BatchedMode(model, prompts, args.max_tokens, b, Path(tmp)) for b in args.max_batch]
        reference = None
        for mode in modes:  # untimed: compiles every shape the mode will use
            _, outputs = mode()
            reference = reference or outputs
            if outputs != reference:
                bad = [i for i in reference if outputs.get(i) != reference[i]]
                raise SystemExit(f"{mode.name}: outputs differ from one-at-a-time for requests {bad[:10]}")
        # Rounds interleave the modes, so a burst of load from elsewhere hits all of them alike.
        times = {mode.name: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                elapsed, outputs = mode()
                if outputs != reference:
                    raise SystemExit(f"{mode.name}: outputs changed between runs")
                times[mode.name].append(elapsed)
    rows = [dict(mode=name, wall_s=statistics.median(t), wall_s_all=t) for name, t in times.items()]
    single_s = rows[0]["wall_s"]
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
