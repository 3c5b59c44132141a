"""Test session setup: JAX on the CPU with 8 fake devices for mesh tests, shared checkpoints."""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")
# This process compiles without XLA's expensive LLVM passes: its models are tiny, so its tests' time
# goes to compiling, not running (test_model_parity's tp tests: 31 s -> 21 s). The programs compute
# the same functions, only slower, so launched stacks, which run long streams and mostly load
# compiled programs from the cache, keep the default (tests/stack.py gives them no XLA_FLAGS).
COMPILE_FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), COMPILE_FAST_XLA_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from hf_checkpoints import build_checkpoint  # noqa: E402

# One compile cache for the whole session. Without it every test module's stack compiled the same
# demo-model programs afresh (~17 s a stack on this CPU), and so did every ModelRunner built in this
# process (each jits its own functions). Launched processes (stacks, batch runs, the CLI) read
# $SPLITSERVE_COMPILE_CACHE in configure_jax; tests that need a cold start pop it. This process
# keeps programs that took 0.2 s or more to compile (the model's; not the many small ones).
COMPILE_CACHE = tempfile.mkdtemp(prefix="splitserve-test-compile-")
os.environ["SPLITSERVE_COMPILE_CACHE"] = COMPILE_CACHE

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(COMPILE_CACHE, "in-process"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> (directory, torch model); each built once per session."""
    built = {}

    def get(name: str):
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            built[name] = (directory, build_checkpoint(name, directory))
        return built[name]

    return get
