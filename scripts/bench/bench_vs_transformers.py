"""Output tokens/s of a launched splitserve stack against transformers' `generate()`, in one run.

    python scripts/bench/bench_vs_transformers.py [--prompts 64] [--modes disaggregated colocated]
                                                  [--json-out scripts/bench/results/vs_transformers.json]

Same checkpoint and work on both sides: a ~30M-parameter random Llama saved by transformers
(scripts/bench/llama_checkpoint.py, float32), N prompts of 96 random token ids, 48 greedy
output tokens each, EOS ignored.
  (a) transformers: `model.generate` in batches of 16, with torch threads = the machine's cores,
      then with 1 thread (`--hf-threads`); ratios are to the faster of these runs.
  (b) a launched stack (`running_stack`: router in this process, 1 prefill + 1 decode worker
      process, platform cpu, warmup="full"), all N requests sent at once through AsyncClient.
  (c) optionally the same with one colocated worker (`--modes ... colocated`).
Each side is warmed up untimed first (one transformers batch; `--warmup-requests` requests
per stack, on top of the workers' ahead-of-time compilation). The first `--check` outputs of
each stack are compared token by token with transformers'. Issue 6's target: the stack serves
at least 2x transformers' output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from llama_checkpoint import LLAMA_30M, build_hf_llama  # a sibling: scripts/bench/ is sys.path[0]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    prompts: int = 64
    prompt_len: int = 96
    output_len: int = 48
    hf_batch: int = 16
    # torch threads per transformers run. Cores is the baseline issue 6 names; 1 thread as well,
    # because on a shared machine torch's OpenMP threads can lose badly to other processes.
    hf_threads: tuple[int, ...] = (os.cpu_count() or 1, 1)
    modes: tuple[str, ...] = ("disaggregated",)
    max_batch: int = 64  # of the stack's decode worker: every request decodes at once
    warmup_requests: int = 16
    check: int = 4  # outputs compared token by token with transformers'
    seed: int = 0

    def __post_init__(self):
        if not set(self.modes) <= {"disaggregated", "colocated"}:
            raise ValueError(f"modes must be disaggregated and/or colocated, got {self.modes}")
        if min(self.prompts, self.prompt_len, self.output_len, self.hf_batch, self.max_batch, *self.hf_threads) < 1:
            raise ValueError("prompts, lengths and batch sizes must be >= 1")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    seconds: float
    outputs: list[list[int]]  # generated token ids per prompt


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(n, length)).tolist()  # ids 0-2 are pad/BOS/EOS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- (a) transformers -----------------------------------------------------------------------
def hf_generate(model, prompts: list[list[int]], cfg: BenchConfig) -> list[list[int]]:
    import torch

    out = []
    for i in range(0, len(prompts), cfg.hf_batch):
        ids = torch.tensor(prompts[i: i + cfg.hf_batch])  # equal lengths: no padding, mask all ones
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.output_len,
                                 do_sample=False, pad_token_id=0)
        out += gen[:, ids.shape[1]:].tolist()
    return out


def run_transformers(model_dir: Path, prompts: list[list[int]], cfg: BenchConfig, threads: int) -> Run:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # No EOS, so every row generates exactly output_len tokens, as ignore_eos does on the stack.
    # (min_new_tokens would instead mask the EOS logit, which changes the greedy argmax.)
    model.generation_config.eos_token_id = None
    hf_generate(model, prompts[: cfg.hf_batch], cfg)  # warm-up: first-call allocations
    start = time.perf_counter()
    outputs = hf_generate(model, prompts, cfg)
    seconds = time.perf_counter() - start
    name = f"transformers generate (batch {cfg.hf_batch}, {threads} torch thread{'s' * (threads > 1)})"
    log(f"{name}: {seconds:.1f} s")
    return Run(name, seconds, outputs)


# -- (b, c) a launched stack ----------------------------------------------------------------
async def send_all(address: str, prompts: list[list[int]], cfg: BenchConfig) -> list[list[int]]:
    from splitserve.runtime.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        done = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=cfg.output_len, ignore_eos=True)
                                      for p in prompts))
    return [c.token_ids for c in done]


def run_stack(model_dir: Path, prompts: list[list[int]], warmup: list[list[int]], cfg: BenchConfig,
              mode: str) -> Run:
    from splitserve.runtime.launch import LaunchConfig, running_stack

    # KV for every request at once, with room to spare: 64 x 144 tokens is 0.13 GiB here.
    launch = LaunchConfig(model=str(model_dir), port=0, mode=mode, platform="cpu", warmup="full",
                          max_batch=cfg.max_batch, kv_cache_gib=0.5, log_level="WARNING")
    start = time.perf_counter()
    with running_stack(launch) as (router, _):
        log(f"{mode} stack ready in {time.perf_counter() - start:.0f} s (workers compiled every shape)")
        asyncio.run(send_all(router.address, warmup, cfg))
        start = time.perf_counter()
        outputs = asyncio.run(send_all(router.address, prompts, cfg))
        seconds = time.perf_counter() - start
    log(f"splitserve {mode}: {seconds:.1f} s")
    return Run(f"splitserve {mode}", seconds, outputs)


# -- report ---------------------------------------------------------------------------------
def summarize(runs: list[Run], cfg: BenchConfig) -> list[dict]:
    """Ratios are to the fastest transformers run; outputs are compared with the first one's."""
    hf = [r for r in runs if r.name.startswith("transformers")]
    fastest, base, rows = min(r.seconds for r in hf), hf[0], []
    for run in runs:
        lengths = {len(o) for o in run.outputs}
        if lengths != {cfg.output_len}:
            raise SystemExit(f"{run.name}: output lengths {sorted(lengths)}, expected {cfg.output_len}")
        tokens = sum(len(o) for o in run.outputs)
        agree = sum(a == b for a, b in zip(run.outputs[: cfg.check], base.outputs[: cfg.check]))
        rows.append(dict(name=run.name, output_tokens=tokens, seconds=run.seconds, tokens_per_s=tokens / run.seconds,
                         ratio=fastest / run.seconds, agree=agree))
    return rows


def print_table(rows: list[dict], cfg: BenchConfig, num_params: int, loads: dict[str, tuple[float, ...]]) -> None:
    load = "; ".join(f"{when} " + " ".join(f"{x:.2f}" for x in avg) for when, avg in loads.items())
    print(f"{cfg.prompts} prompts x {cfg.prompt_len} random token ids -> {cfg.output_len} greedy tokens each; "
          f"{num_params / 1e6:.1f}M-param Llama, float32; {os.cpu_count()} CPUs, load average (1, 5, 15 min): {load}")
    print("| side | output tokens | seconds | output tokens/s | vs fastest transformers | "
          f"first {cfg.check} outputs equal to transformers' |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['output_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} "
              f"| {r['ratio']:.2f}x | {r['agree']}/{cfg.check} |")


def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    parser.add_argument("--prompts", type=int, default=d.prompts, help="number of requests")
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len)
    parser.add_argument("--output-len", type=int, default=d.output_len)
    parser.add_argument("--hf-batch", type=int, default=d.hf_batch, help="transformers generate() batch size")
    parser.add_argument("--hf-threads", type=int, nargs="+", default=list(d.hf_threads),
                        help="torch thread counts, one transformers run each (default: cores, then 1)")
    parser.add_argument("--modes", nargs="+", default=list(d.modes), help="disaggregated and/or colocated")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="the stack's decode batch limit")
    parser.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    parser.add_argument("--check", type=int, default=d.check, help="outputs compared with transformers'")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cfg = BenchConfig(prompts=args.prompts, prompt_len=args.prompt_len, output_len=args.output_len,
                      hf_batch=args.hf_batch, hf_threads=tuple(dict.fromkeys(args.hf_threads)),
                      modes=tuple(args.modes), max_batch=args.max_batch,
                      warmup_requests=args.warmup_requests, check=args.check, seed=args.seed)
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_vs_hf-") as tmp:
        model_dir = Path(tmp)
        num_params = build_hf_llama(model_dir)
        prompts = make_prompts(cfg.prompts, cfg.prompt_len, LLAMA_30M["vocab_size"], cfg.seed)
        warmup = make_prompts(cfg.warmup_requests, cfg.prompt_len, LLAMA_30M["vocab_size"], cfg.seed + 1)
        runs = [run_transformers(model_dir, prompts, cfg, threads) for threads in cfg.hf_threads]
        runs += [run_stack(model_dir, prompts, warmup, cfg, mode) for mode in cfg.modes]
    load = os.getloadavg()
    rows = summarize(runs, cfg)
    print_table(rows, cfg, num_params, {"at start": load_start, "at end": load})
    if args.json_out:
        import jax
        import torch
        import transformers

        result = dict(config=dataclasses.asdict(cfg), model=dict(LLAMA_30M, num_params=num_params), rows=rows,
                      date=time.strftime("%Y-%m-%d"),
                      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg_start=load_start,
                                   load_avg_end=load, jax=jax.__version__, torch=torch.__version__,
                                   transformers=transformers.__version__))
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
