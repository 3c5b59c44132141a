"""What the OpenAI-compatible HTTP layer costs: one launched stack (`launch --openai-port`), the
same workload sent through the SDK (gRPC, straight to the router) and through `openai-server`
(HTTP, which then calls the router with the async SDK), side by side. Rounds alternate which
path goes first (this machine's speed drifts by 10-30% over minutes), and the ratio column is the
median of the rounds' own HTTP / SDK ratios.

    python scripts/bench/bench_openai_overhead.py [--model demo] [--num-prompts 64] [--input-len 128]
        [--output-len 64] [--max-concurrency 16] [--rounds 3] [--json-out F]

Both paths use `splitserve bench`'s drivers (runtime/serving_bench: driver.py for the SDK,
openai_driver.py for HTTP, which counts output tokens from the usage as `vllm bench serve` does).
Prints the median of the rounds for each path, and the median per-round ratio HTTP / SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROWS = (("output tokens/s", "output_throughput"), ("TTFT mean (ms)", "mean_ttft_ms"),
        ("TTFT p99 (ms)", "p99_ttft_ms"), ("TPOT mean (ms)", "mean_tpot_ms"), ("TPOT p99 (ms)", "p99_tpot_ms"),
        ("ITL mean (ms)", "mean_itl_ms"), ("E2EL p99 (ms)", "p99_e2el_ms"))


def launch(model: str) -> tuple[subprocess.Popen, str, str]:
    """(launch process, router address, HTTP base URL) once both listen."""
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", "launch", "--model", model, "--port", "0",
           "--openai-port", "0"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, SPLITSERVE_LOG_LEVEL="WARNING"))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 900
    while True:
        text = "".join(lines)
        ready = re.search(r"splitserve ready on (\S+)", text)
        http = re.search(r"openai-server on (http://\S+)/v1", text)
        if ready and http:
            return process, ready.group(1), http.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the stack did not start:\n" + text[-3000:])
        time.sleep(0.1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json-out")
    args = p.parse_args(argv)

    from splitserve.runtime.serving_bench.compare import stop_process
    from splitserve.runtime.serving_bench.session import openai_target
    from splitserve.runtime.serving_bench.sweep import SweepSpec, sweep
    from splitserve.runtime.serving_bench.workloads import WorkloadSpec

    spec = SweepSpec(WorkloadSpec(num_prompts=args.num_prompts, random_input_len=args.input_len,
                                  random_output_len=args.output_len), max_concurrency=args.max_concurrency,
                     num_warmups=args.max_concurrency)
    process, address, base_url = launch(args.model)
    try:
        targets = {"SDK (gRPC)": address, "HTTP (openai-server)": openai_target(base_url, args.model)}
        metrics: dict[str, list[dict]] = {label: [] for label in targets}
        for round_ in range(args.rounds):
            order = list(targets.items())
            for label, target in order if round_ % 2 == 0 else reversed(order):
                (doc,), _ = sweep(target, spec, {}, label=label, echo=lambda *_: None)
                errors = [r["error"] for r in doc["requests"] if not r["success"]]
                if errors:
                    raise RuntimeError(f"{label}: {len(errors)} requests failed, e.g. {errors[0]}")
                metrics[label].append(doc["metrics"])
    finally:
        stop_process(process)
    sdk, http = targets
    print(f"{args.num_prompts} random prompts of {args.input_len} tokens, {args.output_len} output tokens, "
          f"max concurrency {args.max_concurrency}, median of {args.rounds} rounds")
    print(f"| metric | {sdk} | {http} | HTTP / SDK (median of the rounds' ratios) |\n|---|---|---|---|")
    table = {}
    for row, key in ROWS:
        a, b = (statistics.median(m[key] for m in metrics[label]) for label in (sdk, http))
        ratio = statistics.median(h[key] / s[key] for s, h in zip(metrics[sdk], metrics[http]))
        table[key] = dict(sdk=a, http=b, ratio=ratio)
        print(f"| {row} | {a:.2f} | {b:.2f} | {ratio:.2f}x |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), args=vars(args),
                           medians=table, rounds=metrics, load_avg=os.getloadavg()), f, indent=1)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
