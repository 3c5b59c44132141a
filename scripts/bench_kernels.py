"""Attention kernel speed against the device's ceilings and the peers, measured in one run.

    python scripts/bench_kernels.py [--platform auto|cpu|gpu|tpu] [--dtype bfloat16]
                                    [--contexts 2048 4096 8192] [--skewed-contexts 1024]
                                    [--json-out results.json]

Two ceilings are measured first, in the same process (device_ceilings.py):
  copy bandwidth   a jitted `x + 1` over a large device array (bytes read + written)
  matmul rate      a large square matrix product in the benchmark dtype
Then, per shape, each implementation runs on the same random inputs (never zeros; a shuffled
page table): its output is compared with the plain-JAX reference computed in float32, and its
median time over `--reps` runs after warm-up is reported as
  decode (paged_attention)   achieved bandwidth = KV bytes read / time (K and V of every row's
                             tokens, plus q and the output), and its fraction of the copy
                             bandwidth. Every row holds `context` tokens; in a "skewed" shape
                             (--skewed-contexts, CPU default 1024) one row in 16 holds `context`
                             tokens and the rest an eighth of it, as when a long prompt decodes
                             among short chats
  prefill (flash_attention)  achieved rate = causal FLOPs / time (2 x batch x heads x seq^2 x
                             head_dim: QK^T and PV over the lower triangle), and its fraction of
                             the matmul rate
  prefill+prefix             the last --prefix-new-tokens of that prompt (default seq / 8) after a
                             cached prefix of the rest: `flash_attention(..., q_offsets=)`; FLOPs
                             2 x batch x heads x (seq^2 - prefix^2) x head_dim
Implementations, by platform:
  gpu  decode:  ours ("gpu", Pallas), the reference under XLA, JAX's own Pallas GPU paged
                attention where the installed JAX has it
       prefill: ours ("gpu"), the reference under XLA, jax.nn.dot_product_attention (cuDNN)
  tpu  decode:  ours ("tpu"), the reference;  prefill: ours ("tpu"), the reference
  cpu  decode:  "xla" (what the model runs on a CPU), the reference
       prefill: the reference, jax.nn.dot_product_attention (XLA)
  all  prefill+prefix: ours on gpu/tpu, the reference, and the model's plain-JAX path (queries in
                chunks, models/attention.py), which the model runs on a CPU
A peer that fails (not installed, shape unsupported) is listed with its error, not skipped
silently. The table is printed; `--json-out` writes every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform as host_platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from device_ceilings import copy_gbytes_per_s, matmul_tflops, median_ms

DEFAULTS = {  # per platform: (decode contexts, skewed contexts, prefill seq, heads, kv_heads, head_dim, dtype)
    "gpu": ((2048, 4096, 8192), (), 4096, 32, 8, 128, "bfloat16"),
    "tpu": ((2048, 4096, 8192), (), 4096, 32, 8, 128, "bfloat16"),
    "cpu": ((256, 1024), (1024,), 512, 8, 4, 64, "float32"),
}
SKEW_EVERY = 16  # a skewed shape: rows 0, 16, 32, ... hold the full context, the rest 1/SKEW_SHORT of it
SKEW_SHORT = 8


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    platform: str
    dtype: str
    decode_batch: int
    contexts: tuple[int, ...]
    prefill_batch: int
    prefill_seq: int
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    reps: int
    copy_mib: int
    matmul_n: int
    tune: bool = False  # also time DECODE_GPU_VARIANTS / FLASH_GPU_VARIANTS (GPU only)
    skewed_contexts: tuple[int, ...] = ()
    prefix_new_tokens: int = 0  # the prefill+prefix shape's new tokens (0: no such shape)

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if min(self.decode_batch, self.prefill_batch, self.prefill_seq, self.page_size, self.reps, *self.contexts,
               *self.skewed_contexts) < 1:
            raise ValueError("batch sizes, lengths, page size and reps must be >= 1")
        if not 0 <= self.prefix_new_tokens < self.prefill_seq:
            raise ValueError(f"--prefix-new-tokens must be in [0, prefill seq {self.prefill_seq}), "
                             f"got {self.prefix_new_tokens}")


@dataclasses.dataclass
class Row:
    kernel: str  # "decode" or "prefill"
    shape: str
    impl: str
    ms: float | None = None
    achieved: float | None = None  # TB/s (decode) or TFLOP/s (prefill)
    of_ceiling: float | None = None
    vs_best_peer: float | None = None  # best other implementation's time / this one's (>1: faster)
    rel_err: float | None = None
    error: str | None = None


# -- implementations --------------------------------------------------------------------------
# --tune: other block settings of our GPU kernels, timed beside the defaults to choose them.
DECODE_GPU_VARIANTS = [  # (pages_per_compute_block, num_splits, num_warps, num_stages)
    (8, None, 4, 2), (8, None, 8, 3), (4, 2, 4, 3), (16, None, 8, 2), (2, None, 4, 3), (8, 4, 4, 2),
]
FLASH_GPU_VARIANTS = [  # (block_q, block_k, num_warps, num_stages)
    (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2),
]
VARIANT_PREFIX = "splitserve gpu "
# Above this relative error against the f32 reference an output is wrong, not imprecise (bf16 lands
# near 2e-3): such a row is timed and shown, but no other row is compared with it.
WRONG_REL_ERR = 0.1


def decode_impls(platform: str, tune: bool = False) -> dict[str, Callable]:
    from splitserve.pallas_kernels import paged_attention, paged_attention_gpu

    ours = {"gpu": "gpu", "tpu": "tpu", "cpu": "xla"}[platform]
    impls = {f"splitserve {ours}": functools.partial(paged_attention, impl=ours),
             "reference (XLA)": functools.partial(paged_attention, impl="reference")}
    if platform == "gpu":
        impls["jax pallas gpu paged_attention"] = _jax_gpu_paged
        for ppcb, splits, warps, stages in DECODE_GPU_VARIANTS if tune else []:
            impls[f"{VARIANT_PREFIX}ppcb={ppcb} splits={splits} warps={warps} stages={stages}"] = functools.partial(
                paged_attention_gpu, pages_per_compute_block=ppcb, num_splits=splits, num_warps=warps,
                num_stages=stages)
    return impls


def _jax_gpu_paged(q, k_pages, v_pages, lengths, page_indices):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    # It applies no softmax scale: q comes pre-scaled, as for every peer without a scale argument.
    return paged_attention(_prescaled(q), k_pages, v_pages, page_indices, lengths)


def _prescaled(q):
    return q * (q.shape[-1] ** -0.5)


def prefill_impls(platform: str, tune: bool = False) -> dict[str, Callable]:
    from splitserve.pallas_kernels import flash_attention, flash_attention_gpu

    def ours(impl):
        return lambda q, k, v, lengths: flash_attention(q, k, v, lengths=lengths, impl=impl)

    impls = {"reference (XLA)": ours("reference")}
    if platform in ("gpu", "tpu"):
        impls = {f"splitserve {platform}": ours(platform), **impls}
    if platform == "gpu":
        impls["jax.nn.dot_product_attention (cuDNN)"] = functools.partial(_dot_product_attention, implementation="cudnn")
        impls["jax pallas mosaic-gpu attention (Hopper, float16)"] = _jax_mosaic_gpu_attention
        for bq, bk, warps, stages in FLASH_GPU_VARIANTS if tune else []:
            impls[f"{VARIANT_PREFIX}bq={bq} bk={bk} warps={warps} stages={stages}"] = functools.partial(
                flash_attention_gpu, block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
    if platform == "cpu":
        impls["jax.nn.dot_product_attention (XLA)"] = functools.partial(_dot_product_attention, implementation="xla")
    return impls


def prefix_impls(platform: str) -> dict[str, Callable]:
    from splitserve.models.attention import attention_after_prefix
    from splitserve.pallas_kernels import flash_attention

    def ours(impl):
        return lambda q, k, v, lengths, offsets: flash_attention(q, k, v, lengths=lengths, q_offsets=offsets, impl=impl)

    impls = {"reference (XLA)": ours("reference"),
             "query chunks (XLA)": lambda q, k, v, lengths, offsets: attention_after_prefix(q, k, v, offsets, lengths)}
    if platform in ("gpu", "tpu"):
        impls = {f"splitserve {platform}": ours(platform), **impls}
    return impls


def _jax_mosaic_gpu_attention(q, k, v, lengths=None):
    """JAX's own Mosaic GPU (Hopper, warpgroup) flash attention; full lengths only."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    # float16 only (bfloat16 is refused); no softmax scale of its own, so q comes pre-scaled.
    half = [x.astype("float16") for x in (_prescaled(q), k, v)]
    return attention_mgpu.attention(*half, config)


def _dot_product_attention(q, k, v, lengths=None, *, implementation):
    import jax

    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


# -- inputs -----------------------------------------------------------------------------------
def decode_lengths(cfg: BenchConfig, context: int, skewed: bool = False) -> np.ndarray:
    lengths = np.full((cfg.decode_batch,), context, np.int32)
    if skewed:
        lengths[np.arange(cfg.decode_batch) % SKEW_EVERY != 0] = max(1, context // SKEW_SHORT)
    return lengths


def decode_inputs(cfg: BenchConfig, context: int, seed: int, skewed: bool = False):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // cfg.page_size)
    total = cfg.decode_batch * pages_per_seq + 1
    kv_shape = (cfg.kv_heads, total, cfg.page_size, cfg.head_dim)
    q = jnp.asarray(rng.standard_normal((cfg.decode_batch, cfg.heads, cfg.head_dim)), cfg.dtype)
    k, v = (jnp.asarray(rng.standard_normal(kv_shape), cfg.dtype) for _ in range(2))
    table = rng.permutation(total)[: cfg.decode_batch * pages_per_seq].reshape(cfg.decode_batch, pages_per_seq)
    return q, k, v, jnp.asarray(decode_lengths(cfg, context, skewed)), jnp.asarray(table.astype(np.int32))


def prefill_inputs(cfg: BenchConfig, seed: int):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    b, s = cfg.prefill_batch, cfg.prefill_seq
    q = jnp.asarray(rng.standard_normal((b, s, cfg.heads, cfg.head_dim)), cfg.dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, s, cfg.kv_heads, cfg.head_dim)), cfg.dtype) for _ in range(2))
    return q, k, v, jnp.full((b,), s, jnp.int32)


def decode_bytes(cfg: BenchConfig, context: int, skewed: bool = False) -> int:
    itemsize = np.dtype(cfg.dtype).itemsize
    kv = int(decode_lengths(cfg, context, skewed).sum()) * cfg.kv_heads * cfg.head_dim * 2 * itemsize
    return kv + 2 * cfg.decode_batch * cfg.heads * cfg.head_dim * itemsize  # + q and the output


def prefill_flops(cfg: BenchConfig) -> float:
    return 2.0 * cfg.prefill_batch * cfg.heads * cfg.prefill_seq**2 * cfg.head_dim


def prefix_flops(cfg: BenchConfig) -> float:
    prefix = cfg.prefill_seq - cfg.prefix_new_tokens
    return 2.0 * cfg.prefill_batch * cfg.heads * (cfg.prefill_seq**2 - prefix**2) * cfg.head_dim


# -- running ----------------------------------------------------------------------------------
def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def run_shape(kernel: str, shape: str, impls: dict[str, Callable], inputs, reference_out, work: float,
              ceiling: float, reps: int) -> list[Row]:
    import jax

    rows = []
    for name, fn in impls.items():
        row = Row(kernel, shape, name)
        try:
            jitted = jax.jit(fn)
            row.rel_err = rel_err(jitted(*inputs), reference_out)
            row.ms = median_ms(lambda: jitted(*inputs), reps)
            row.achieved = work / (row.ms / 1e3) / 1e12
            row.of_ceiling = row.achieved / ceiling
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
    for row in rows:  # our rows are compared with the peers only, not with each other
        ours = row.impl.startswith("splitserve")
        others = [r.ms for r in rows if r is not row and r.ms is not None and _right(r)
                  and not (ours and r.impl.startswith("splitserve"))]
        if row.ms is not None and others:
            row.vs_best_peer = min(others) / row.ms
    return rows


def _right(row: Row) -> bool:
    return row.rel_err is not None and row.rel_err < WRONG_REL_ERR  # NaN is not right either


def run(cfg: BenchConfig) -> tuple[dict, list[Row]]:
    import jax
    import jax.numpy as jnp

    from splitserve.pallas_kernels import flash_attention_reference, paged_attention_reference

    ceilings = {"copy_tbytes_per_s": copy_gbytes_per_s(cfg.copy_mib, cfg.reps) / 1e3,
                "matmul_tflops": matmul_tflops(cfg.matmul_n, cfg.dtype, cfg.reps)}
    rows: list[Row] = []
    ref_paged = jax.jit(lambda q, k, v, l, t: paged_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), l, t))
    shapes = [(c, False) for c in cfg.contexts] + [(c, True) for c in cfg.skewed_contexts]
    for i, (context, skewed) in enumerate(shapes):
        inputs = decode_inputs(cfg, context, seed=i, skewed=skewed)
        ctx = f"1/{SKEW_EVERY} at {context}, rest {max(1, context // SKEW_SHORT)}" if skewed else str(context)
        shape = f"b={cfg.decode_batch} ctx={ctx} h={cfg.heads}/{cfg.kv_heads} d={cfg.head_dim} page={cfg.page_size}"
        rows += run_shape("decode", shape, decode_impls(cfg.platform, cfg.tune), inputs, ref_paged(*inputs),
                          decode_bytes(cfg, context, skewed), ceilings["copy_tbytes_per_s"], cfg.reps)
    inputs = prefill_inputs(cfg, seed=100)
    q, k, v, lengths = inputs
    reference_out = jax.jit(lambda q, k, v, l: flash_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lengths=l))(q, k, v, lengths)
    shape = f"b={cfg.prefill_batch} seq={cfg.prefill_seq} h={cfg.heads}/{cfg.kv_heads} d={cfg.head_dim} causal"
    rows += run_shape("prefill", shape, prefill_impls(cfg.platform, cfg.tune), inputs, reference_out, prefill_flops(cfg),
                      ceilings["matmul_tflops"], cfg.reps)
    if cfg.prefix_new_tokens:  # the prompt's last tokens, after a cached prefix of the rest
        new = cfg.prefix_new_tokens
        offsets = jnp.full((cfg.prefill_batch,), cfg.prefill_seq - new, jnp.int32)
        shape = (f"b={cfg.prefill_batch} new={new} after {cfg.prefill_seq - new} "
                 f"h={cfg.heads}/{cfg.kv_heads} d={cfg.head_dim}")
        rows += run_shape("prefill+prefix", shape, prefix_impls(cfg.platform), (q[:, -new:], k, v, lengths, offsets),
                          reference_out[:, -new:], prefix_flops(cfg), ceilings["matmul_tflops"], cfg.reps)
    return ceilings, rows


def print_table(cfg: BenchConfig, ceilings: dict, rows: list[Row], device: str) -> None:
    print(f"{device}; {cfg.dtype}; copy {ceilings['copy_tbytes_per_s']:.4g} TB/s, "
          f"matmul {ceilings['matmul_tflops']:.2f} TFLOP/s (measured in this run)")
    print("| kernel | shape | implementation | ms (median) | TB/s or TFLOP/s | of ceiling | vs best peer | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.error:
            print(f"| {r.kernel} | {r.shape} | {r.impl} | failed: {r.error} | | | | |")
            continue
        peer = f"{r.vs_best_peer:.2f}x" if r.vs_best_peer is not None else "-"
        if not _right(r):
            peer = "wrong output"
        print(f"| {r.kernel} | {r.shape} | {r.impl} | {r.ms:.3f} | {r.achieved:.4g} | {r.of_ceiling:.0%} | "
              f"{peer} | {r.rel_err:.1e} |")


def parse_args(argv=None) -> tuple[BenchConfig, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", choices=["auto", "cpu", "gpu", "tpu"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--contexts", type=int, nargs="+", help="decode contexts (default: 2048 4096 8192; CPU 256 1024)")
    p.add_argument("--skewed-contexts", type=int, nargs="*",
                   help=f"skewed decode shapes: one row in {SKEW_EVERY} at this context, the rest at 1/{SKEW_SHORT} "
                        "(default: none; CPU 1024)")
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-seq", type=int, help="prefill tokens (default 4096; CPU 512)")
    p.add_argument("--prefix-new-tokens", type=int,
                   help="new tokens after a cached prefix, the prefill+prefix shape (default seq / 8; 0: none)")
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--copy-mib", type=int, help="copy ceiling array size (default 2048; CPU 512)")
    p.add_argument("--matmul-n", type=int, help="matmul ceiling size (default 8192; CPU 2048)")
    p.add_argument("--tune", action="store_true", help="also time other block settings of the GPU kernels")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    platform = args.platform
    if platform != "auto":
        from splitserve.runtime.platform_setup import jax_platforms

        os.environ.setdefault("JAX_PLATFORMS", jax_platforms(platform))
    import jax

    backend = jax.default_backend()
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if platform not in DEFAULTS:
        p.error(f"unsupported JAX backend {backend!r}")
    contexts, skewed, seq, heads, kv_heads, head_dim, dtype = DEFAULTS[platform]
    small = platform == "cpu"
    try:
        return BenchConfig(
            platform=platform, dtype=args.dtype or dtype, decode_batch=args.decode_batch,
            contexts=tuple(args.contexts or contexts), prefill_batch=args.prefill_batch,
            prefill_seq=args.prefill_seq or seq, heads=args.heads or heads, kv_heads=args.kv_heads or kv_heads,
            head_dim=args.head_dim or head_dim, page_size=args.page_size, reps=args.reps,
            copy_mib=args.copy_mib or (512 if small else 2048), matmul_n=args.matmul_n or (2048 if small else 8192),
            tune=args.tune, skewed_contexts=tuple(skewed if args.skewed_contexts is None else args.skewed_contexts),
            prefix_new_tokens=((args.prefill_seq or seq) // 8 if args.prefix_new_tokens is None
                               else args.prefix_new_tokens),
        ), args.json_out
    except ValueError as e:
        p.error(str(e))


def main(argv=None) -> int:
    cfg, json_out = parse_args(argv)
    import jax

    device = f"{jax.devices()[0].device_kind} ({cfg.platform}, JAX {jax.__version__})"
    ceilings, rows = run(cfg)
    print_table(cfg, ceilings, rows, device)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(dict(
            config=dataclasses.asdict(cfg), device=device, ceilings=ceilings, rows=[dataclasses.asdict(r) for r in rows],
            date=datetime.date.today().isoformat(),
            machine=dict(platform=host_platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
        ), indent=1))
    failed = [r for r in rows if r.error and r.impl.startswith("splitserve") and not r.impl.startswith(VARIANT_PREFIX)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
