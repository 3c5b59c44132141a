"""Roofline of the decode step: achieved memory bandwidth against the bandwidth measured in the same run.

    python scripts/bench/bench_roofline.py [--models demo llama30m] [--batches 1 8 32] [--contexts 512 2048]
                                           [--platform cpu|gpu] [--json-out scripts/bench/results/roofline_cpu.json]

A decode step reads every weight once and every active sequence's KV once, and does little
arithmetic per byte, so its floor is (bytes read) / (memory bandwidth). For each model, batch
and context this times `ModelRunner.decode` in this process (no gRPC; the median of `--steps`
steps after `--warmup-steps` untimed ones, host overhead included: building the page table,
copying the sampled tokens back) and reports

    bytes per step = weights read + KV read
        weights read = every parameter, less the input embedding table of an untied model
                       (a lookup reads `batch` rows of it, not all of it)
        KV read      = batch x context x 2 (K and V) x layers x kv_heads x head_dim x itemsize
    achieved GB/s  = bytes per step / step time,

against the copy bandwidth measured in the same run: on the CPU a numpy copy of a `--copy-mib`
array (1 thread, and the array split over every core), on any platform a jitted `x + 1` over a
device array of that size, in place (XLA's own threads on the CPU); read + write, so 2x the
array's bytes; best of `--copy-reps`. The reference is the fastest of these (on a GPU, the
device one). Models: `demo`, `llama30m` (scripts/bench/llama_checkpoint.py, built with
transformers into a temp dir) or an HF/Orbax directory.

The byte count is the useful traffic. The plain-JAX paged attention used off TPU gathers each
row's pages into a temporary first, so the memory system moves more than this; the gap to the
copy bandwidth is how much a kernel could win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class RooflineConfig:
    models: tuple[str, ...] = ("demo", "llama30m")
    batches: tuple[int, ...] = (1, 8, 32)
    contexts: tuple[int, ...] = (512, 2048)  # tokens attended per sequence, the new one included
    steps: int = 20
    warmup_steps: int = 3
    copy_mib: int = 1024  # 2 GiB touched: well past a large server L3 (480 MiB on this CPU)
    copy_reps: int = 5
    platform: str = "cpu"
    dtype: str = "auto"
    page_size: int = 16

    def __post_init__(self):
        if min(*self.batches, *self.contexts, self.steps, self.copy_mib, self.copy_reps, self.page_size) < 1:
            raise ValueError("batches, contexts, steps, copy size and page size must be >= 1")
        if self.platform not in ("cpu", "gpu", "cuda", "tpu"):
            raise ValueError(f"platform must be cpu, gpu or tpu, got {self.platform!r}")


@dataclasses.dataclass(frozen=True)
class StepBytes:
    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv


@dataclasses.dataclass(frozen=True)
class DecodeFigure:
    model: str
    batch: int
    context: int
    step_s: float  # median
    step_s_min: float
    bytes: StepBytes

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes.total / self.step_s / 1e9


# -- bytes ----------------------------------------------------------------------------------
def kv_bytes(batch: int, context: int, layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    return batch * context * 2 * layers * kv_heads * head_dim * itemsize


def weight_bytes_read(params: dict, tied: bool) -> int:
    """Bytes of the weights one decode step reads: all of them but an untied model's input embedding."""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    return total if tied else total - params["embed"].nbytes


def step_bytes(runner, batch: int, context: int) -> StepBytes:
    from flax import nnx

    spec, cfg = runner.cache_spec, runner.model.config
    params = nnx.to_pure_dict(runner.model.params)
    return StepBytes(weight_bytes_read(params, cfg.tie_word_embeddings),
                     kv_bytes(batch, context, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                              np.dtype(spec.dtype).itemsize))


# -- decode timing --------------------------------------------------------------------------
def make_runner(model, max_batch: int, max_context: int, page_size: int):
    from splitserve.runtime.model_runner import ModelRunner, RunnerConfig

    pages_per_seq = -(-max_context // page_size)
    # min_decode_batch=1: a batch of 1 runs as 1 row, not padded to the serving minimum of 8.
    return ModelRunner(model, RunnerConfig(page_size=page_size, num_pages=max_batch * pages_per_seq + 1,
                                           max_batch=max_batch, max_prefill_batch=1, min_decode_batch=1))


def measure_decode(runner, name: str, batch: int, context: int, steps: int, warmup_steps: int) -> DecodeFigure:
    """Times `runner.decode` for `batch` sequences of `context` tokens each (own pages, zero KV)."""
    from splitserve.runtime.sampling import SamplingParams

    page_size = runner.config.page_size
    if context > runner.max_model_len:
        raise ValueError(f"context {context} exceeds the model's {runner.max_model_len}")
    pages = -(-context // page_size)
    page_lists = [list(range(1 + row * pages, 1 + (row + 1) * pages)) for row in range(batch)]
    tokens = np.random.default_rng(0).integers(3, runner.model.config.vocab_size, batch).tolist()
    positions = [context - 1] * batch  # writes the new token's K/V, then attends over all `context`
    sampling, sample_steps = [SamplingParams(max_tokens=2)] * batch, [0] * batch
    times = []
    for i in range(warmup_steps + steps):
        start = time.perf_counter()
        runner.decode(tokens, positions, page_lists, sampling, sample_steps)  # returns host ints: synced
        if i >= warmup_steps:
            times.append(time.perf_counter() - start)
    return DecodeFigure(name, batch, context, statistics.median(times), min(times), step_bytes(runner, batch, context))


# -- copy bandwidth -------------------------------------------------------------------------
def numpy_copy_gbps(nbytes: int, threads: int, reps: int) -> float:
    """Best read+write GB/s of np.copyto over `nbytes`, the array split into `threads` slices."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)  # touched, so page faults stay out of the timing
    slices = np.array_split(np.arange(src.size), threads)
    bounds = [(int(s[0]), int(s[-1]) + 1) for s in slices if s.size]
    with ThreadPoolExecutor(threads) as pool:  # np.copyto releases the GIL
        def copy() -> None:
            list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))

        return 2 * src.nbytes / _best_seconds(copy, reps) / 1e9


def device_copy_gbps(nbytes: int, reps: int) -> float:
    """Best read+write GB/s of a jitted `x + 1` on the default device (XLA cannot elide it).

    The input is donated and the result fed back, so the output reuses the input's buffer: a fresh
    output would pay page faults on the CPU (5 GB/s instead of 22 here), which is not bandwidth.
    """
    import jax
    import jax.numpy as jnp

    add_one = jax.jit(lambda a: a + 1, donate_argnums=0)
    state = {"x": jax.block_until_ready(add_one(jnp.ones(nbytes // 4, jnp.float32)))}  # compiled

    def step() -> None:
        state["x"] = jax.block_until_ready(add_one(state["x"]))

    return 2 * nbytes / _best_seconds(step, reps) / 1e9


def _best_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(cfg: RooflineConfig) -> dict[str, float]:
    nbytes = cfg.copy_mib << 20
    figures = {"device x+1": device_copy_gbps(nbytes, cfg.copy_reps)}
    if cfg.platform == "cpu":
        for threads in dict.fromkeys((1, os.cpu_count() or 1)):
            figures[f"numpy copy, {threads} thread{'s' * (threads > 1)}"] = numpy_copy_gbps(nbytes, threads,
                                                                                          cfg.copy_reps)
    return figures


# -- models ---------------------------------------------------------------------------------
def load(name: str, dtype: str, workdir: Path):
    from splitserve.models.loader import load_model
    from splitserve.models.sharding import MeshConfig, make_mesh

    path = name
    if name == "llama30m":
        from llama_checkpoint import build_hf_llama  # a sibling: scripts/bench/ is sys.path[0]

        path = str(workdir / name)
        build_hf_llama(Path(path))
    return load_model(path, make_mesh(MeshConfig(tp=1)), dtype=dtype)


def run(cfg: RooflineConfig, workdir: Path) -> tuple[dict[str, float], list[DecodeFigure]]:
    bandwidth = measure_bandwidth(cfg)  # before any cache is allocated: the copy arrays come and go
    figures = []
    for name in cfg.models:
        model = load(name, cfg.dtype, workdir)
        runner = make_runner(model, max(cfg.batches), max(cfg.contexts), cfg.page_size)
        for context in cfg.contexts:
            for batch in cfg.batches:
                figures.append(measure_decode(runner, name, batch, context, cfg.steps, cfg.warmup_steps))
                print(f"  {name} batch {batch} context {context}: {figures[-1].step_s * 1e3:.2f} ms",
                      file=sys.stderr, flush=True)
        del runner, model  # free the KV cache before the next model's
    return bandwidth, figures


def print_table(bandwidth: dict[str, float], figures: list[DecodeFigure], ref: float, load_avg) -> None:
    print("copy bandwidth (read + write): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())
          + f"; reference {ref:.1f} GB/s; L3 {l3_size()}; load average " + " ".join(f"{x:.2f}" for x in load_avg))
    print("| model | batch | context | step ms (median) | weights MB | KV MB | achieved GB/s | of reference |\n"
          "|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f.model} | {f.batch} | {f.context} | {f.step_s * 1e3:.2f} | {f.bytes.weights / 1e6:.1f} "
              f"| {f.bytes.kv / 1e6:.1f} | {f.gbytes_per_s:.2f} | {100 * f.gbytes_per_s / ref:.0f}% |")


def l3_size() -> str | None:
    """The last-level cache as the OS reports it: weights that fit in it need not come from DRAM."""
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return path.read_text().strip() if path.exists() else None


def parse_args(argv=None) -> tuple[RooflineConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RooflineConfig()
    parser.add_argument("--models", nargs="+", default=list(d.models), help="demo, llama30m, or a checkpoint dir")
    parser.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    parser.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts))
    parser.add_argument("--steps", type=int, default=d.steps, help="timed decode steps per shape (median)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--copy-mib", type=int, default=d.copy_mib, help="array size of the copy bandwidth test")
    parser.add_argument("--copy-reps", type=int, default=d.copy_reps)
    parser.add_argument("--platform", default=d.platform, help="cpu, gpu or tpu")
    parser.add_argument("--dtype", default=d.dtype, help="auto, float32 or bfloat16")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cfg = RooflineConfig(models=tuple(args.models), batches=tuple(args.batches), contexts=tuple(args.contexts),
                         steps=args.steps, warmup_steps=args.warmup_steps, copy_mib=args.copy_mib,
                         copy_reps=args.copy_reps, platform=args.platform, dtype=args.dtype)
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    from splitserve.runtime.platform_setup import configure_jax

    configure_jax(cfg.platform)
    import jax

    with tempfile.TemporaryDirectory(prefix="bench_roofline-") as tmp:
        bandwidth, figures = run(cfg, Path(tmp))
    load_avg = os.getloadavg()
    platform_name = jax.default_backend()
    ref = max(bandwidth.values())  # the most this run showed the memory can do
    print_table(bandwidth, figures, ref, load_avg)
    if args.json_out:
        rows = [dict(dataclasses.asdict(f), gbytes_per_s=f.gbytes_per_s, of_reference=f.gbytes_per_s / ref)
                for f in figures]
        result = dict(config=dataclasses.asdict(cfg), copy_gbytes_per_s=bandwidth, reference_gbytes_per_s=ref,
                      rows=rows, date=time.strftime("%Y-%m-%d"),
                      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=load_avg, l3=l3_size(),
                                   jax=jax.__version__, backend=platform_name, device=str(jax.devices()[0])))
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
