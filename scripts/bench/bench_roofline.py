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
import traceback
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
    attention_impls: tuple[str, ...] = ("auto",)  # the model's attention, e.g. ("reference", "gpu") on a GPU

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
    attention_impl: str
    batch: int
    context: int
    step_s: float  # median
    step_s_min: float
    bytes: StepBytes
    device_step_s: float  # the decode program alone, its inputs already on the device

    @property
    def device_gbytes_per_s(self) -> float:
        return self.bytes.total / self.device_step_s / 1e9

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
def make_runner(model, max_batch: int, max_context: int, page_size: int, attention_impl: str = "auto"):
    from splitserve.runtime.model_runner import ModelRunner, RunnerConfig

    pages_per_seq = -(-max_context // page_size)
    # min_decode_batch=1: a batch of 1 runs as 1 row, not padded to the serving minimum of 8.
    runner = ModelRunner(model, RunnerConfig(page_size=page_size, num_pages=max_batch * pages_per_seq + 1,
                                             max_batch=max_batch, max_prefill_batch=1, min_decode_batch=1,
                                             attention_impl=attention_impl))
    fill_cache_randomly(runner)
    return runner


def fill_cache_randomly(runner, seed: int = 0) -> None:
    """Random K/V in every page: timing on a zero cache can flatter the step (and hides nothing)."""
    import jax

    leaves, treedef = jax.tree.flatten(runner.cache)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.device_put(jax.random.normal(key, x.shape, x.dtype), x.sharding) for key, x in zip(keys, leaves)]
    runner.cache = jax.tree.unflatten(treedef, leaves)


def measure_decode(runner, name: str, batch: int, context: int, steps: int, warmup_steps: int) -> DecodeFigure:
    """Times `runner.decode` for `batch` sequences of `context` tokens each (own pages, random KV)."""
    from splitserve.runtime.sampling_params import SamplingParams

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
    device_s = device_step_seconds(runner, runner.decode_inputs(tokens, positions, page_lists, sampling, sample_steps))
    return DecodeFigure(name, runner.config.attention_impl, batch, context, statistics.median(times), min(times),
                        step_bytes(runner, batch, context), device_s)


def device_step_seconds(runner, inputs: tuple, reps: int = 3, calls: int = 5) -> float:
    """The decode program alone: inputs put on the device once, `calls` steps dispatched back to
    back (each takes the cache the previous one returned) and one wait at the end; the mean per
    step, median over `reps`. Its gap to the full step is host work: building the inputs,
    dispatch, copying the sampled tokens back."""
    import jax

    inputs = jax.device_put(inputs)
    times = []
    for _ in range(reps + 1):  # the first rep is a warm-up
        start = time.perf_counter()
        for _ in range(calls):
            next_tokens = runner.decode_step(inputs)
        jax.block_until_ready(next_tokens)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times[1:])


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
    elif name == "llama1b":
        from llama_checkpoint import LLAMA_1B, build_random_llama

        path = str(workdir / name)
        build_random_llama(Path(path), LLAMA_1B)
    return load_model(path, make_mesh(MeshConfig(tp=1)), dtype=dtype)


def run(cfg: RooflineConfig, workdir: Path) -> tuple[dict[str, float], list[DecodeFigure], list[str]]:
    """Returns the copy bandwidths, the figures, and the (model, attention) pairs that failed."""
    bandwidth = measure_bandwidth(cfg)  # before any cache is allocated: the copy arrays come and go
    figures, failed = [], []
    for name in cfg.models:
        model = load(name, cfg.dtype, workdir)
        for impl in cfg.attention_impls:
            try:
                runner = make_runner(model, max(cfg.batches), max(cfg.contexts), cfg.page_size, impl)
                for context in cfg.contexts:
                    for batch in cfg.batches:
                        figures.append(measure_decode(runner, name, batch, context, cfg.steps, cfg.warmup_steps))
                        print(f"  {name} ({impl} attention) batch {batch} context {context}: "
                              f"{figures[-1].step_s * 1e3:.2f} ms", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - one attention that fails must not lose the others' figures
                traceback.print_exc()
                print(f"  {name} ({impl} attention) FAILED (traceback above)", file=sys.stderr, flush=True)
                failed.append(f"{name} ({impl} attention)")
            runner = None  # free the KV cache before the next one
        del model
    return bandwidth, figures, failed


def print_table(bandwidth: dict[str, float], figures: list[DecodeFigure], ref: float, load_avg) -> None:
    print("copy bandwidth (read + write): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())
          + f"; reference {ref:.1f} GB/s; L3 {l3_size()}; load average " + " ".join(f"{x:.2f}" for x in load_avg))
    print("| model | attention | batch | context | step ms (median) | device ms | weights MB | KV MB | achieved GB/s "
          "| of reference | device GB/s | of reference |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f.model} | {f.attention_impl} | {f.batch} | {f.context} | {f.step_s * 1e3:.2f} "
              f"| {f.device_step_s * 1e3:.2f} | {f.bytes.weights / 1e6:.1f} "
              f"| {f.bytes.kv / 1e6:.1f} | {f.gbytes_per_s:.2f} | {100 * f.gbytes_per_s / ref:.0f}% "
              f"| {f.device_gbytes_per_s:.2f} | {100 * f.device_gbytes_per_s / ref:.0f}% |")


def l3_size() -> str | None:
    """The last-level cache as the OS reports it: weights that fit in it need not come from DRAM."""
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return path.read_text().strip() if path.exists() else None


def parse_args(argv=None) -> tuple[RooflineConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RooflineConfig()
    parser.add_argument("--models", nargs="+", default=list(d.models),
                        help="demo, llama30m, llama1b (TinyLlama-1.1B shapes, random), or a checkpoint dir")
    parser.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    parser.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts))
    parser.add_argument("--steps", type=int, default=d.steps, help="timed decode steps per shape (median)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--copy-mib", type=int, default=d.copy_mib, help="array size of the copy bandwidth test")
    parser.add_argument("--copy-reps", type=int, default=d.copy_reps)
    parser.add_argument("--platform", default=d.platform, help="cpu, gpu or tpu")
    parser.add_argument("--dtype", default=d.dtype, help="auto, float32 or bfloat16")
    parser.add_argument("--attention-impls", nargs="+", default=list(d.attention_impls),
                        help="the model's attention: auto, reference, xla, gpu, tpu (each timed in turn)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cfg = RooflineConfig(models=tuple(args.models), batches=tuple(args.batches), contexts=tuple(args.contexts),
                         steps=args.steps, warmup_steps=args.warmup_steps, copy_mib=args.copy_mib,
                         copy_reps=args.copy_reps, platform=args.platform, dtype=args.dtype,
                         attention_impls=tuple(args.attention_impls))
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    from splitserve.runtime.platform_setup import configure_jax

    configure_jax(cfg.platform)
    import jax

    with tempfile.TemporaryDirectory(prefix="bench_roofline-") as tmp:
        bandwidth, figures, failed = run(cfg, Path(tmp))
    load_avg = os.getloadavg()
    platform_name = jax.default_backend()
    ref = max(bandwidth.values())  # the most this run showed the memory can do
    print_table(bandwidth, figures, ref, load_avg)
    if args.json_out:
        rows = [dict(dataclasses.asdict(f), gbytes_per_s=f.gbytes_per_s, of_reference=f.gbytes_per_s / ref,
                     device_gbytes_per_s=f.device_gbytes_per_s, device_of_reference=f.device_gbytes_per_s / ref)
                for f in figures]
        result = dict(config=dataclasses.asdict(cfg), copy_gbytes_per_s=bandwidth, reference_gbytes_per_s=ref,
                      rows=rows, failed=failed, date=time.strftime("%Y-%m-%d"),
                      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=load_avg, l3=l3_size(),
                                   jax=jax.__version__, backend=platform_name, device=str(jax.devices()[0])))
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
