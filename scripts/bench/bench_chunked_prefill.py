"""Chunked prefill against whole prefill, while long prompts arrive at a busy stack.

    python scripts/bench/bench_chunked_prefill.py [--model demo] [--chunk 256] [--long 1900] [--rounds 3]
                                                   [--json-out F]

Four stacks up at once (idle stacks cost no CPU): colocated and disaggregated, each with and
without `--prefill-chunk-tokens`. Rounds alternate between them, so drift on a noisy machine hits
all alike. In a round, `--streams` requests decode (`--stream-tokens` tokens each); meanwhile a
long prompt arrives, and a short one just after it. Per stack, medians over the rounds of:
- the longest gap between a decoding stream's tokens, and the p99 of those gaps (a colocated
  worker's decode waits for a whole prefill; with chunks, for one chunk);
- the long prompt's TTFT, and the short prompt's (it waits behind the long prompt's prefill, on a
  colocated worker and on a prefill worker alike, unless chunks let it in between).
A first round on every stack is not counted: it compiles what warm-up left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

METRICS = ("stream_gap_max_ms", "stream_gap_p99_ms", "long_ttft_ms", "short_ttft_ms")


def one_round(client, rng, vocab: int, args) -> dict:
    """Streams decoding, a long prompt arriving `args.long_after` s in, a short one just after it."""
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]
    ttfts: dict[str, float] = {}

    def prompt(tokens: int) -> list[int]:  # drawn here: the generator is not thread-safe
        return [int(t) for t in rng.integers(3, vocab, size=tokens)]

    def stream(i: int, prompt_ids: list[int]) -> None:
        for _ in client.stream(token_ids=prompt_ids, max_tokens=args.stream_tokens, ignore_eos=True):
            arrivals[i].append(time.perf_counter())

    def one_token(name: str, prompt_ids: list[int], delay: float) -> None:
        time.sleep(delay)
        ttfts[name] = client.generate(token_ids=prompt_ids, max_tokens=1).ttft_s

    threads = [threading.Thread(target=stream, args=(i, prompt(16))) for i in range(args.streams)]
    threads += [threading.Thread(target=one_token, args=("long", prompt(args.long), args.long_after)),
                threading.Thread(target=one_token, args=("short", prompt(16), args.long_after + 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gaps = np.concatenate([np.diff(times) for times in arrivals]) * 1e3
    return {"stream_gap_max_ms": float(gaps.max()), "stream_gap_p99_ms": float(np.percentile(gaps, 99)),
            "long_ttft_ms": ttfts["long"] * 1e3, "short_ttft_ms": ttfts["short"] * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--platform", default="cpu")
    parser.add_argument("--chunk", type=int, default=256, help="--prefill-chunk-tokens of the chunked stacks")
    parser.add_argument("--long", type=int, default=1900, help="the long prompt's tokens")
    parser.add_argument("--long-after", type=float, default=0.3, help="seconds into a round it arrives")
    parser.add_argument("--streams", type=int, default=4, help="requests decoding meanwhile")
    parser.add_argument("--stream-tokens", type=int, default=150, help="tokens each of them decodes")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per stack")
    parser.add_argument("--json-out", help="write the results here")
    args = parser.parse_args(argv)
    if args.chunk < 1 or args.rounds < 1 or args.streams < 1 or args.stream_tokens < 2:
        parser.error("--chunk, --rounds and --streams must be >= 1, --stream-tokens >= 2")

    from splitserve.runtime.client import Client
    from splitserve.runtime.launch import LaunchConfig, running_stack

    common = dict(model=args.model, port=0, platform=args.platform, kv_cache_gib=0.25, warmup="minimal",
                  log_level="WARNING")
    stacks = {f"{mode}{suffix}": LaunchConfig(mode=mode, decode_workers=1, prefill_chunk_tokens=chunk, **common)
              for mode in ("colocated", "disaggregated") for suffix, chunk in (("", 0), (" chunked", args.chunk))}
    results: dict[str, list[dict]] = {name: [] for name in stacks}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, config in stacks.items():
            router, _ = stack.enter_context(running_stack(config))
            clients[name] = stack.enter_context(Client(router.address, timeout=300))
        vocab = next(iter(clients.values())).model_info().vocab_size
        rng = np.random.default_rng(0)
        for round_index in range(args.rounds + 1):
            for name, client in clients.items():
                figures = one_round(client, rng, vocab, args)
                if round_index:  # round 0 compiles
                    results[name].append(figures)

    medians = {name: {m: statistics.median(r[m] for r in rounds) for m in METRICS} for name, rounds in results.items()}
    print(f"load average {os.getloadavg()[0]:.1f}; {args.streams} streams decoding, a {args.long}-token prompt "
          f"and a 16-token one arriving; chunks of {args.chunk}; medians of {args.rounds} rounds")
    print(f"{'stack':<32}" + "".join(f"{m:>20}" for m in METRICS))
    for name, row in medians.items():
        print(f"{name:<32}" + "".join(f"{row[m]:>20.1f}" for m in METRICS))
    for mode in ("colocated", "disaggregated"):
        ratio = {m: medians[f"{mode} chunked"][m] / medians[mode][m] for m in METRICS}
        print(f"{mode + ' chunked / whole':<32}" + "".join(f"{ratio[m]:>19.2f}x" for m in METRICS))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "platform": args.platform, "args": vars(args),
                       "load_average": os.getloadavg()[0], "rounds": results, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
