"""Process-level setup: JAX platform flags (before `import jax`), shutdown signals, parent death."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import Callable


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


class StopRequested(BaseException):
    """SIGTERM or SIGINT came while a server was still starting. A BaseException, so that no
    `except Exception` on the way out of a start-up swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} while starting")
        self.exit_code = 128 + signum


class StopSignals:
    """What SIGTERM and SIGINT do to a server.

    - While it starts (loading, compiling, waiting for workers: minutes), StopRequested is raised
      in the main thread, so the start is abandoned at once; the handler only setting a flag
      let a launch compile on, and even report "ready", long after it was told to stop.
    - Once `serving()` was called, the first signal sets the event: the server drains.
    - A second signal exits at once, as a second Ctrl-C does in vLLM (the drain can take its
      whole timeout), after `before_exit` (launch: SIGKILL to its workers).
    """

    def __init__(self, exit_after_s: float | None = None):
        """`exit_after_s`: once StopRequested has been raised, exit the process anyway this many seconds
        later. For a worker, which holds nothing yet that needs a clean stop: a raise that lands in
        code whose exceptions Python ignores (a destructor, a weakref callback) is swallowed, and the
        start went on to its end (seen once in CI: a worker killed by launch after 40 s)."""
        self.event = threading.Event()
        self.exit_after_s = exit_after_s
        self._starting = True
        self.before_exit: Callable[[], None] | None = None  # on a second signal (launch: kill the workers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def serving(self) -> None:
        self._starting = False

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)

    def is_set(self) -> bool:
        return self.event.is_set()

    def _on_signal(self, signum, frame) -> None:
        if self.event.is_set():
            try:
                sys.stderr.write(f"splitserve: {signal.Signals(signum).name} again: exiting without waiting\n")
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr a closed pipe (the parent is gone): exit all the same
                pass
            if self.before_exit is not None:
                self.before_exit()
            os._exit(128 + signum)
        self.event.set()
        if self._starting:
            if self.exit_after_s is not None:
                timer = threading.Timer(self.exit_after_s, self._exit_while_starting, (signum,))
                timer.daemon = True
                timer.start()
            raise StopRequested(signum)

    def _exit_while_starting(self, signum: int) -> None:
        try:
            sys.stderr.write(f"splitserve: {signal.Signals(signum).name} while starting, and the start went on "
                             f"{self.exit_after_s:.0f} s later: exiting\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(128 + signum)


def stop_on_signals(exit_after_s: float | None = None) -> StopSignals:
    return StopSignals(exit_after_s)


# Set by launch's supervisor to its own pid: the child then asks for a parent-death signal.
DIE_WITH_PARENT_ENV = "SPLITSERVE_DIE_WITH_PARENT"
PR_SET_PDEATHSIG = 1


def die_with_parent_if_asked() -> None:
    """SIGTERM when launch goes, even by SIGKILL, so that no worker outlives it (Linux).

    Asked for here, in the child, rather than in a preexec_fn between fork and exec: that runs
    Python in a child forked from a process with threads (the router's), which can deadlock.
    A parent that died before the request was made is caught by comparing the parent's pid.
    """
    parent = os.environ.pop(DIE_WITH_PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent) and not _exists(int(parent)):  # not merely a wrapper that forked us
        sys.stderr.write("splitserve: the process that started this one has exited; stopping\n")
        raise SystemExit(128 + signal.SIGTERM)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
