"""Timing, and the device's two ceilings, for scripts/bench_kernels.py: copy bandwidth and matmul rate,
measured in the same process as the kernels they are compared with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def median_ms(fn: Callable[[], object], reps: int, calls_per_rep: int = 10) -> float:
    """Median over `reps` of the mean time of `calls_per_rep` back-to-back calls.

    The calls of one rep are dispatched without waiting (device work is asynchronous) and the
    clock stops when the last one finishes, so the host's per-call dispatch cost overlaps the
    device work instead of adding to a sub-millisecond kernel's time.
    """
    import jax

    jax.block_until_ready(fn())  # compile and warm up
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls_per_rep - 1):
            fn()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) / calls_per_rep)
    return statistics.median(times) * 1e3


def copy_gbytes_per_s(mib: int, reps: int) -> float:
    import jax
    import jax.numpy as jnp

    # The input is donated and the result fed back, so the output reuses the input's buffer: a
    # fresh output each time pays first-touch page faults on a CPU (9 GB/s instead of ~40 here).
    add_one = jax.jit(lambda a: a + 1, donate_argnums=0)
    state = {"x": jax.block_until_ready(add_one(jnp.ones((mib * 2**20 // 4,), jnp.float32)))}

    def step():
        state["x"] = add_one(state["x"])
        return state["x"]

    return 2 * state["x"].nbytes / (median_ms(step, reps) / 1e3) / 1e9


def matmul_tflops(n: int, dtype: str, reps: int) -> float:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n)), dtype) for _ in range(2))
    product = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / (median_ms(lambda: product(a, b), reps) / 1e3) / 1e12
