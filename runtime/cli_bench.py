"""`splitserve bench` / `python scripts/benchmark_serving.py`: the serving benchmark.

Flags map onto serving_bench's specs; workloads, timing, metrics and reports live there.
"""

from __future__ import annotations

import argparse
import sys

from splitserve.runtime.cli_args import add_prefill_chunk_flag, add_prefix_cache_flags, positive_int

DESCRIPTION = """\
Benchmark a running router (--address) or compare a colocated and a disaggregated stack on
the same devices (--compare), with the metrics of `vllm bench serve`: TTFT, TPOT =
(latency - TTFT) / (n - 1), ITL (every inter-token gap), end-to-end latency (mean, median,
p50/p90/p99), request and token throughput, and goodput (requests/s meeting every --goodput SLO).

Workloads (--dataset), every request sent with ignore_eos so it yields its output length:
  random    random token-id prompts; lengths uniform in [L*(1-r), L*(1+r)], r = --random-range-ratio;
            --random-prefix-len P puts one random P-token start before every prompt (prefix caching)
  sharegpt  --dataset-path FILE: first human turn as the text prompt, output = tokens of the
            first gpt reply (capped by --sharegpt-max-output-len); filtered as vLLM does
  mixed     short chats plus a fraction (--mixed-long-fraction, default 0.1) of long prompts
            (default 7/8 of the model's context); reports the interference metric: TPOT of
            short requests decoding while a long prompt is being prefilled
--base-url benchmarks an OpenAI-compatible server over HTTP instead (streamed /v1/completions with
ignore_eos; output lengths from the usage, as vllm bench serve counts them), so the same workload
can be run against splitserve's openai-server and another server.
Arrivals: --request-rate R (req/s, Poisson; 'inf' = all at once; '1,2,4' = one run per rate),
--burstiness B (gamma shape; 1 = Poisson, < 1 burstier), --max-concurrency N.

--compare launches `splitserve launch --mode colocated` (devices / colocated tp workers) and
then the disaggregated stack (--prefill-workers x --prefill-mesh + --decode-workers x
--decode-mesh), runs the same requests at the same arrival times on each, prints both
results and a table of disaggregated / colocated.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="HOST:PORT of a running router to benchmark")
    where.add_argument("--compare", action="store_true",
                       help="launch a colocated and a disaggregated stack on the same devices and compare them")
    where.add_argument("--base-url", help="an OpenAI-compatible server to benchmark over HTTP (splitserve "
                       "openai-server, vLLM, SGLang), e.g. http://127.0.0.1:8000; --model names its checkpoint; "
                       "the key is $OPENAI_API_KEY or $SPLITSERVE_API_KEY; SSL_CERT_FILE=ca.pem for a private CA")
    p.add_argument("--model", help="model the --compare stacks serve (default demo); with --base-url (required "
                   "there) the checkpoint the server serves, for its vocabulary, EOS ids and context")
    p.add_argument("--served-model-name", help="with --base-url: the model name requests give (default: the first "
                   "of GET /v1/models)")
    p.add_argument("--tokenizer", help="tokenizer for --dataset sharegpt: HF directory or 'demo' (default: --model)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["random", "sharegpt", "mixed"], default="random")
    w.add_argument("--dataset-path", help="ShareGPT-format JSON file (--dataset sharegpt)")
    w.add_argument("--num-prompts", type=int, default=100, help="requests per run (default 100)")
    w.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens (default 1024)")
    w.add_argument("--random-output-len", type=int, default=128, help="random: output tokens (default 128)")
    w.add_argument("--random-prefix-len", type=int, default=0,
                   help="random: tokens every prompt starts with, before its own --random-input-len (a shared "
                        "system prompt, as vLLM's; default 0)")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="spread of every random/mixed length: uniform in [L*(1-r), L*(1+r)], 0 <= r < 1 (default 0)")
    w.add_argument("--sharegpt-output-len", type=int, help="sharegpt: fixed output length instead of the reply's")
    w.add_argument("--sharegpt-max-output-len", type=int, default=256, help="sharegpt: cap on the reply's length "
                   "(default 256)")
    w.add_argument("--mixed-long-fraction", type=float, default=0.1, help="mixed: fraction of long prompts (0.1)")
    w.add_argument("--mixed-short-input-len", type=int, default=128, help="mixed: short prompt tokens (128)")
    w.add_argument("--mixed-short-output-len", type=int, default=128, help="mixed: short output tokens (128)")
    w.add_argument("--mixed-long-input-len", type=int,
                   help="mixed: long prompt tokens (default 7/8 of the context, lowered to fit the range ratio)")
    w.add_argument("--mixed-long-output-len", type=int, default=32, help="mixed: long output tokens (32)")
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", default="inf", help="req/s, 'inf', or a comma list to sweep (default inf)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson (default)")
    a.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    a.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals (default 0)")
    a.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent and discarded before measuring, to compile shapes (default 0)")
    a.add_argument("--timeout", type=float, help="per-request deadline in seconds (default none)")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    o.add_argument("--result-json", help="write every metric and every request's record here")
    o.add_argument("--plot-dir", help="write latency_cdf.png (and latency_vs_rate.png for a sweep) here")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    c = p.add_argument_group("--compare stacks")
    c.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform of the workers")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    c.add_argument("--prefill-workers", type=int, default=1, help="disaggregated: prefill workers (default 1)")
    c.add_argument("--decode-workers", type=int, default=1, help="disaggregated: decode workers (default 1)")
    c.add_argument("--prefill-mesh", default="tp=1", help="disaggregated: each prefill worker's mesh (tp=1)")
    c.add_argument("--decode-mesh", default="tp=1", help="disaggregated: each decode worker's mesh (tp=1)")
    c.add_argument("--colocated-mesh", default="tp=1", help="colocated: each worker's mesh (tp=1)")
    c.add_argument("--page-size", type=positive_int, default=16, help="KV page size in tokens (default 16)")
    c.add_argument("--max-batch", type=positive_int, default=32, help="decode batch per worker (default 32)")
    c.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache memory per device (default 1.0)")
    c.add_argument("--num-pages", type=positive_int, help="KV pages per worker (default: from --kv-cache-gib)")
    add_prefix_cache_flags(c, "both stacks' prefill (or colocated) workers")
    add_prefill_chunk_flag(c)
    c.add_argument("--warmup", choices=["full", "minimal"], default="full",
                   help="what the workers compile before serving (as `launch --warmup`; minimal: faster start, "
                        "use --num-warmups to compile the workload's shapes before measuring)")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="serving benchmark: a running router, or colocated vs disaggregated",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run)


def build_parser(prog: str = "benchmark_serving.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    from splitserve.runtime.client import SplitserveError
    from splitserve.runtime.serving_bench.session import run_session

    try:
        return run_session(args)
    except ValueError as e:  # a bad flag value, a workload that does not fit the model
        raise SystemExit(f"splitserve bench: {e}")
    except SplitserveError as e:  # no router at --address
        raise SystemExit(f"splitserve bench: cannot reach {args.address or 'the launched stack'}: {e}")


if __name__ == "__main__":
    sys.exit(main())
