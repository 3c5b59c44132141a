"""Colocated vs disaggregated on the same devices, one workload, one command.

    devices = prefill_workers * prefill tp + decode_workers * decode tp
    colocated:      devices / colocated tp workers, each running both phases on its own mesh
    disaggregated:  the prefill and decode workers as given
On CPU with the defaults that is 2 colocated workers (tp=1) against 1 prefill + 1 decode
(tp=1). Each stack is started (`splitserve launch` as a child process, so the router does
not share this process's GIL with the client), warmed up, benchmarked at every request rate
with the same requests and arrival times, and stopped before the next one starts.
Colocated runs first. The summary table lists disaggregated / colocated for every metric,
including the interference TPOT p99 (interference.py) on the mixed workload.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import threading
import time

from splitserve.models.mesh_config import MeshConfig
from splitserve.runtime.launch import LaunchConfig
from splitserve.runtime.serving_bench.sweep import SweepSpec, sweep


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    model: str = "demo"
    platform: str | None = None
    dtype: str = "auto"
    prefill_workers: int = 1
    decode_workers: int = 1
    prefill_mesh: MeshConfig = MeshConfig()
    decode_mesh: MeshConfig = MeshConfig()
    colocated_mesh: MeshConfig = MeshConfig()
    page_size: int = 16
    max_batch: int = 32
    kv_cache_gib: float = 1.0
    num_pages: int | None = None
    warmup: str = "full"  # what each worker compiles before serving (LaunchConfig.warmup)
    prefix_cache_gib: float = 0.0  # prefix caching on both stacks' prefill (or colocated) workers; 0: off
    prefill_chunk_tokens: int = 0  # chunked prefill on both stacks' prefill (or colocated) workers; 0: off

    @property
    def devices(self) -> int:
        return self.prefill_workers * self.prefill_mesh.tp + self.decode_workers * self.decode_mesh.tp

    def stacks(self) -> list[tuple[str, LaunchConfig]]:
        """[("colocated", ...), ("disaggregated", ...)], both on `devices` devices."""
        if self.devices % self.colocated_mesh.tp:
            raise ValueError(f"{self.devices} devices do not split into colocated workers of "
                             f"tp={self.colocated_mesh.tp}")
        common = dict(model=self.model, port=0, platform=self.platform, dtype=self.dtype, page_size=self.page_size,
                      max_batch=self.max_batch, kv_cache_gib=self.kv_cache_gib, num_pages=self.num_pages,
                      warmup=self.warmup, prefix_cache_gib=self.prefix_cache_gib,
                      prefill_chunk_tokens=self.prefill_chunk_tokens)
        colocated = LaunchConfig(mode="colocated", decode_workers=self.devices // self.colocated_mesh.tp,
                                 decode_mesh=self.colocated_mesh, **common)
        disaggregated = LaunchConfig(mode="disaggregated", prefill_workers=self.prefill_workers,
                                     decode_workers=self.decode_workers, prefill_mesh=self.prefill_mesh,
                                     decode_mesh=self.decode_mesh, **common)
        return [("colocated", colocated), ("disaggregated", disaggregated)]


def launch_flags(config: LaunchConfig) -> list[str]:
    """`splitserve launch` flags for a LaunchConfig."""
    flags = ["--model", config.model, "--host", config.host, "--port", str(config.port), "--mode", config.mode,
             "--decode-workers", str(config.decode_workers), "--decode-mesh", f"tp={config.decode_mesh.tp}",
             "--dtype", config.dtype, "--page-size", str(config.page_size), "--max-batch", str(config.max_batch),
             "--kv-cache-gib", str(config.kv_cache_gib), "--warmup", config.warmup]
    if config.mode == "disaggregated":  # launch refuses prefill flags in colocated mode
        flags += ["--prefill-workers", str(config.prefill_workers), "--prefill-mesh", f"tp={config.prefill_mesh.tp}"]
    if config.num_pages is not None:
        flags += ["--num-pages", str(config.num_pages)]
    if config.prefix_cache_gib:
        flags += ["--prefix-cache-gib", str(config.prefix_cache_gib)]
    if config.prefill_chunk_tokens:
        flags += ["--prefill-chunk-tokens", str(config.prefill_chunk_tokens)]
    if config.platform:
        flags += ["--platform", config.platform]
    return flags


@contextlib.contextmanager
def launched_stack(config: LaunchConfig, timeout_s: float = 900.0):
    """Runs `splitserve launch` for `config`; yields the router's address; stops every process on exit."""
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", "launch", *launch_flags(config)]
    env = dict(os.environ, SPLITSERVE_LOG_LEVEL="WARNING")
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: collections.deque[str] = collections.deque(maxlen=200)  # the stack's log, drained so it never blocks
    threading.Thread(target=_drain, args=(process.stdout, lines), daemon=True).start()
    try:
        yield _wait_ready(process, lines, time.monotonic() + timeout_s)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (launch drains and stops its children), then SIGKILL past `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _drain(stream, lines: collections.deque) -> None:
    for line in stream:
        lines.append(line)


def _wait_ready(process: subprocess.Popen, lines: collections.deque, deadline: float) -> str:
    while True:
        for line in list(lines):
            if m := re.match(r"splitserve ready on (\S+)", line):
                return m.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the stack did not start:\n" + "".join(list(lines)[-30:]))
        time.sleep(0.1)


def compare(spec: CompareSpec, sweep_spec: SweepSpec, slos: dict[str, float], echo=print):
    """Returns (run documents, colocated first; the model info of the last stack)."""
    docs, info = [], None
    for label, config in spec.stacks():
        echo(f"starting the {label} stack: {' '.join(launch_flags(config))}")
        with launched_stack(config) as address:
            runs, info = sweep(address, sweep_spec, slos, label=label, echo=echo)
        docs += runs
    return docs, info
