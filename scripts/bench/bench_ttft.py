"""Time to first token, colocated against disaggregated, for single requests on idle stacks.

    python scripts/bench/bench_ttft.py [--model demo] [--lengths 16,256,1024] [--reps 10] [--json-out F]

Issue 6's target: disaggregated TTFT within 10% of colocated for a single request on an idle
stack (the first token comes from prefill; the KV transfer must not add to it). Both stacks
run at once (idle stacks cost no CPU) and requests alternate between them, one at a time, so
drift on a noisy machine hits both alike. Each prompt length is sent twice to each stack
before timing, so no compilation lands in the timed requests. TTFT is the SDK's: from
sending the request to receiving the first token, through the router.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import numpy as np


def measure(clients: dict, lengths: list[int], reps: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ttfts = {name: {n: [] for n in lengths} for name in clients}
    for n in lengths:
        for rep in range(reps + 2):
            prompt = [int(t) for t in rng.integers(3, vocab, size=n)]
            for name, client in clients.items():
                out = client.generate(token_ids=prompt, max_tokens=4, ignore_eos=True)
                if rep >= 2:  # the first two per length warm the shapes
                    ttfts[name][n].append(out.ttft_s)
    return ttfts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--platform", default="cpu")
    parser.add_argument("--lengths", default="16,256,1024", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--reps", type=int, default=10, help="timed requests per length and stack")
    parser.add_argument("--json-out", help="write the results here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]

    from splitserve.runtime.client import Client
    from splitserve.runtime.launch import LaunchConfig, running_stack

    common = dict(model=args.model, port=0, platform=args.platform, kv_cache_gib=0.25, warmup="minimal",
                  log_level="WARNING")
    stacks = {"colocated": LaunchConfig(mode="colocated", decode_workers=1, **common),
              "disaggregated": LaunchConfig(mode="disaggregated", prefill_workers=1, decode_workers=1, **common)}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, config in stacks.items():
            router, _ = stack.enter_context(running_stack(config))
            clients[name] = stack.enter_context(Client(router.address, timeout=120))
        vocab = clients["colocated"].model_info().vocab_size
        ttfts = measure(clients, lengths, args.reps, vocab)

    print(f"load average {os.getloadavg()[0]:.1f}; median (p90) TTFT over {args.reps} requests each")
    print(f"{'prompt':>8}{'colocated ms':>18}{'disaggregated ms':>20}{'disagg / coloc':>16}")
    rows = []
    for n in lengths:
        c, d = (statistics.median(ttfts[k][n]) for k in ("colocated", "disaggregated"))
        c90, d90 = (float(np.percentile(ttfts[k][n], 90)) for k in ("colocated", "disaggregated"))
        print(f"{n:>8}{c * 1e3:>10.1f} ({c90 * 1e3:5.1f}){d * 1e3:>12.1f} ({d90 * 1e3:5.1f}){d / c:>16.2f}")
        rows.append({"prompt_tokens": n, "colocated_ttft_s": ttfts["colocated"][n],
                     "disaggregated_ttft_s": ttfts["disaggregated"][n], "median_ratio": d / c})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "platform": args.platform, "load_average": os.getloadavg()[0],
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
