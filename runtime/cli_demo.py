"""`splitserve demo`: the disaggregated stack on the demo model, a few streamed requests, a table.

Starts a prefill worker and a decode worker (separate processes, separate meshes) and a
router, sends concurrent requests through the SDK, streams the first one to the terminal,
prints TTFT and tokens/s per request and where each phase ran, then stops everything.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import time

from splitserve.models.mesh_config import MeshConfig

PROMPTS = (
    "The weather today is",
    "To bake good bread you need",
    "A server that streams tokens",
    "In the morning the market",
)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the disaggregated stack on the demo model and stream a few requests",
                       description="Start a prefill worker, a decode worker and a router on this host, send "
                                   "a handful of concurrent requests through the client SDK, stream them, "
                                   "print TTFT and tokens/s, then stop everything.")
    p.add_argument("--model", default="demo", help="model to serve (default: the built-in demo model)")
    p.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform of the workers")
    p.add_argument("--prefill-mesh", default="tp=1", help="prefill worker mesh (default tp=1)")
    p.add_argument("--decode-mesh", default="tp=1", help="decode worker mesh (default tp=1)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.set_defaults(run=run)


def run(args) -> int:
    from splitserve.runtime.client import Client
    from splitserve.runtime.launch import LaunchConfig, running_stack

    logging.basicConfig(level=logging.WARNING)
    try:
        config = LaunchConfig(model=args.model, port=0, platform=args.platform,
                              prefill_mesh=MeshConfig.parse(args.prefill_mesh),
                              decode_mesh=MeshConfig.parse(args.decode_mesh), kv_cache_gib=0.25,
                              warmup="minimal",  # the demo's prompts and answers are short
                              log_level="WARNING")
    except ValueError as e:
        raise SystemExit(f"splitserve demo: {e}")
    print("starting a prefill worker, a decode worker and a router (first start builds the demo model)...",
          flush=True)
    start = time.perf_counter()
    with running_stack(config) as (router, _):
        print(f"ready on {router.address} after {time.perf_counter() - start:.1f}s\n", flush=True)
        with Client(router.address) as client:
            info = client.model_info()
            results = _run_requests(client, args.max_tokens)
    _print_table(results, info)
    print("\nstopped every worker.")
    return 0


def _run_requests(client, max_tokens: int):
    def one(i: int):
        chunks, start, first = [], time.perf_counter(), None
        for chunk in client.stream(PROMPTS[i], max_tokens=max_tokens, ignore_eos=True):
            first = first or time.perf_counter()
            chunks.append(chunk)
            if i == 0:  # stream the first request live
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        return i, chunks, start, first, time.perf_counter()

    print(f"[1] {PROMPTS[0]}", end="", flush=True)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = sorted(pool.map(one, range(len(PROMPTS))))
    print("\n")
    for i, chunks, *_ in results[1:]:
        print(f"[{i + 1}] {PROMPTS[i]}{''.join(c.text for c in chunks)}")
    return results


def _print_table(results, info) -> None:
    print(f"\n{'#':>2}  {'TTFT s':>7}  {'tokens':>6}  {'decode tok/s':>12}  finish")
    for i, chunks, start, first, end in results:
        tokens = sum(len(c.token_ids) for c in chunks)
        rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
        print(f"{i + 1:>2}  {first - start:>7.3f}  {tokens:>6}  {rate:>12.1f}  {chunks[-1].finish_reason}")
    print(f"\nmodel {info.name} ({info.family}, {info.dtype}); mode {info.mode}")
    for w in info.workers:
        print(f"  {w.role:<8} phase ran on {w.platform} mesh {w.mesh} at {w.address}")
