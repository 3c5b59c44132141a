"""Model load time: HF safetensors vs the converted Orbax checkpoint, in one run.

    python scripts/bench/bench_load.py [--reps 5] [--tp 1] [--json-out load.json]

Builds a ~30M-parameter random Llama with transformers (save_pretrained, float32) in a
temp dir, converts it with convert_to_orbax, then times `load_model` (until every array
is ready on the mesh) for each format: one untimed warm-up each, then `--reps` timed
loads, alternating, so both see the same machine state. Reports medians and the ratio.
Files are read through the OS page cache after the warm-up: this measures the loaders
(layout conversion, placement, Orbax restore), not cold disk reads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llama_checkpoint import LLAMA_30M as BENCH_CONFIG, build_hf_llama  # a sibling: scripts/bench/ is sys.path[0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed loads per format (after one warm-up)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the target mesh")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--scale", type=int, default=1,
                        help="multiply hidden size and layers' width by this (2 -> ~120M, 4 -> ~480M params)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def scaled_config(scale: int) -> dict:
    return dict(BENCH_CONFIG, hidden_size=BENCH_CONFIG["hidden_size"] * scale,
                  intermediate_size=BENCH_CONFIG["intermediate_size"] * scale,
                  num_attention_heads=BENCH_CONFIG["num_attention_heads"] * scale,
                  num_key_value_heads=BENCH_CONFIG["num_key_value_heads"] * scale)


def build_hf_checkpoint(out_dir: Path, scale: int = 1) -> int:
    return build_hf_llama(out_dir, scaled_config(scale))


def timed_load(path: Path, mesh) -> float:
    import jax
    from flax import nnx

    from splitserve.models.loader import load_model

    start = time.perf_counter()
    loaded = load_model(str(path), mesh)
    jax.block_until_ready(jax.tree.leaves(nnx.to_pure_dict(loaded.params)))
    return time.perf_counter() - start


def run(args, workdir: Path) -> dict:
    import jax

    from splitserve.models.orbax_checkpoint import convert_to_orbax
    from splitserve.models.sharding import MeshConfig, make_mesh

    hf_dir, orbax_dir = workdir / "hf", workdir / "orbax"
    start = time.perf_counter()
    num_params = build_hf_checkpoint(hf_dir, args.scale)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    convert_to_orbax(str(hf_dir), orbax_dir)
    convert_s = time.perf_counter() - start

    mesh = make_mesh(MeshConfig(tp=args.tp))
    paths = {"safetensors": hf_dir, "orbax": orbax_dir}
    warmup = {name: timed_load(p, mesh) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(args.reps):
        order = list(paths) if rep % 2 == 0 else list(paths)[::-1]
        for name in order:
            times[name].append(timed_load(paths[name], mesh))
    medians = {name: statistics.median(t) for name, t in times.items()}

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    return {
        "num_params": num_params,
        "config": scaled_config(args.scale),
        "tp": args.tp,
        "reps": args.reps,
        "platform": jax.devices()[0].platform,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__},
        "build_hf_s": build_s,
        "convert_s": convert_s,
        "bytes": {name: size(p) for name, p in paths.items()},
        "warmup_s": warmup,
        "times_s": times,
        "median_s": medians,
        "orbax_over_safetensors": medians["orbax"] / medians["safetensors"],
    }


def print_table(r: dict) -> None:
    print(f"load of a {r['num_params'] / 1e6:.1f}M-param Llama (float32) onto tp={r['tp']} "
          f"[{r['platform']}], {r['reps']} reps after 1 warm-up each")
    print(f"{'format':<12} {'MB':>8} {'warm-up s':>10} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name in ("safetensors", "orbax"):
        t = r["times_s"][name]
        print(f"{name:<12} {r['bytes'][name] / 1e6:>8.1f} {r['warmup_s'][name]:>10.3f} "
              f"{r['median_s'][name]:>9.3f} {min(t):>7.3f} {max(t):>7.3f}")
    print(f"orbax / safetensors median ratio: {r['orbax_over_safetensors']:.2f}   "
          f"(HF build {r['build_hf_s']:.1f} s, convert {r['convert_s']:.1f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tp > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.tp}").strip()
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=False)
        result = run(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
            result = run(args, Path(tmp))
    print_table(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
