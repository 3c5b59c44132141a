"""Prefix caching: the same stack with and without it, on prompts that share a long start.

    python scripts/bench/bench_prefix_cache.py [--model demo] [--shared 1024] [--unique 32]
        [--output 16] [--requests 32] [--reps 10] [--rounds 3] [--json-out F]

Every prompt is one shared start (a system prompt, few-shot examples) of --shared tokens and
--unique tokens of its own. Two disaggregated stacks (1 prefill + 1 decode worker each) run at
once; one has `--enable-prefix-caching`. Measured in one run:
- TTFT of single requests on the idle stacks, alternating between them;
- --requests requests sent at once, --rounds times, alternating which stack goes first: wall time,
  output tokens/s, mean TTFT.
Untimed requests first fill the cache and compile the shapes. Greedy outputs of the two stacks are
compared token for token. Prints a table; --json-out writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np


def prompts(rng, shared: list[int], unique: int, count: int, vocab: int) -> list[list[int]]:
    return [shared + [int(t) for t in rng.integers(3, vocab, size=unique)] for _ in range(count)]


async def send_all(address: str, batch: list[list[int]], output: int):
    from splitserve.runtime.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        started = time.perf_counter()
        done = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=output, ignore_eos=True)
                                      for p in batch))
        return time.perf_counter() - started, done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--platform", default="cpu")
    parser.add_argument("--shared", type=int, default=1024, help="tokens every prompt starts with")
    parser.add_argument("--unique", type=int, default=32, help="tokens of each prompt's own")
    parser.add_argument("--output", type=int, default=16, help="output tokens per request")
    parser.add_argument("--requests", type=int, default=32, help="requests sent at once per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="single timed requests per stack")
    parser.add_argument("--json-out", help="write the results here")
    args = parser.parse_args(argv)

    from splitserve.runtime.client import Client
    from splitserve.runtime.launch import LaunchConfig, running_stack

    common = dict(model=args.model, port=0, platform=args.platform, kv_cache_gib=0.5, warmup="minimal",
                  log_level="WARNING")
    stacks = {"no cache": LaunchConfig(**common), "prefix cache": LaunchConfig(prefix_cache_gib=0.25, **common)}
    rng = np.random.default_rng(0)
    ttft = {name: [] for name in stacks}
    rounds = {name: [] for name in stacks}
    with contextlib.ExitStack() as stack:
        addresses, clients = {}, {}
        for name, config in stacks.items():
            router, _ = stack.enter_context(running_stack(config))
            addresses[name] = router.address
            clients[name] = stack.enter_context(Client(router.address, timeout=600))
        vocab = clients["no cache"].model_info().vocab_size
        shared = [int(t) for t in rng.integers(3, vocab, size=args.shared)]
        # Untimed: fills the cache, compiles single and batched shapes on both stacks.
        for name in stacks:
            for p in prompts(rng, shared, args.unique, 3, vocab):
                clients[name].generate(token_ids=p, max_tokens=args.output, ignore_eos=True)
            for _ in range(2):
                asyncio.run(send_all(addresses[name], prompts(rng, shared, args.unique, args.requests, vocab),
                                     args.output))
        for p in prompts(rng, shared, args.unique, args.reps, vocab):
            for name in stacks:
                ttft[name].append(clients[name].generate(token_ids=p, max_tokens=4, ignore_eos=True).ttft_s)
        same = total = 0
        for r in range(args.rounds):
            batch = prompts(rng, shared, args.unique, args.requests, vocab)
            order = list(stacks) if r % 2 == 0 else list(reversed(stacks))
            outputs = {}
            for name in order:
                seconds, done = asyncio.run(send_all(addresses[name], batch, args.output))
                rounds[name].append({"seconds": seconds, "output_tokens": sum(len(c.token_ids) for c in done),
                                     "mean_ttft_s": statistics.fmean(c.ttft_s for c in done)})
                outputs[name] = [c.token_ids for c in done]
            same += sum(a == b for a, b in zip(outputs["no cache"], outputs["prefix cache"]))
            total += len(batch)

    def tps(name):
        return statistics.median(r["output_tokens"] / r["seconds"] for r in rounds[name])

    def mean_ttft(name):
        return statistics.median(r["mean_ttft_s"] for r in rounds[name])

    rows = [
        ("single-request TTFT, median (ms)", *(statistics.median(ttft[n]) * 1e3 for n in stacks)),
        (f"{args.requests} at once: output tokens/s (median of rounds)", *(tps(n) for n in stacks)),
        (f"{args.requests} at once: mean TTFT (ms, median of rounds)", *(mean_ttft(n) * 1e3 for n in stacks)),
    ]
    print(f"model {args.model}; {args.shared} shared + {args.unique} own prompt tokens, {args.output} output; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':<52}{'no cache':>12}{'prefix cache':>14}{'cache / none':>14}")
    for label, plain, cached in rows:
        print(f"{label:<52}{plain:>12.1f}{cached:>14.1f}{cached / plain:>14.2f}")
    print(f"greedy outputs equal: {same}/{total}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "platform": args.platform, "shared_tokens": args.shared,
                       "unique_tokens": args.unique, "output_tokens": args.output, "requests": args.requests,
                       "load_average": os.getloadavg()[0], "single_ttft_s": ttft, "rounds": rounds,
                       "outputs_equal": same, "outputs_compared": total}, f, indent=1)
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
