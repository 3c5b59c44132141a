"""Process-level setup: JAX platform flags (before `import jax`) and shutdown signals."""

from __future__ import annotations

import os
import re
import signal
import threading


def configure_jax(platform: str | None, cpu_devices: int = 1) -> None:
    """Selects the JAX platform; exposes `cpu_devices` host devices for CPU meshes.

    The host device count only affects the CPU platform, so it is set whatever the platform.
    """
    if platform:
        os.environ["JAX_PLATFORMS"] = jax_platforms(platform)
    # Compiled programs persist across restarts (warm-up compiles every bucketed shape; a second
    # start of the same model only loads them). $SPLITSERVE_COMPILE_CACHE=off disables it.
    cache = os.environ.get("SPLITSERVE_COMPILE_CACHE") or str(_cache_root() / "jax-compile")
    if cache != "off":
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if cpu_devices > 1:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()


def jax_platforms(platform: str) -> str:
    """The JAX_PLATFORMS value for a --platform name.

    "gpu" means NVIDIA here: JAX_PLATFORMS=gpu makes JAX try ROCm too, and that fails on a CUDA
    machine whose JAX has no ROCm plugin ("Unable to initialize backend 'rocm'", seen on an H200
    with JAX 0.11.2).
    """
    return {"gpu": "cuda"}.get(platform, platform)


def _cache_root():
    from pathlib import Path

    return Path(os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so servers can stop cleanly instead of dying mid-RPC."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
