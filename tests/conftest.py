"""Test session setup: JAX on the CPU with 8 fake devices for mesh tests, shared checkpoints."""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("SPLITSERVE_TEST_PLATFORM", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from hf_checkpoints import build_checkpoint  # noqa: E402

# One compile cache for every process the tests launch (stacks, workers, batch runs, the CLI): the
# same demo-model programs were compiled afresh by each module's stack, ~17 s a stack on this CPU.
# Only launched processes read it (configure_jax); this process keeps JAX's in-memory cache, so
# test_warmup's count of compiles still sees every compile. Tests that need a cold start pop it.
COMPILE_CACHE = tempfile.mkdtemp(prefix="splitserve-test-compile-")
os.environ["SPLITSERVE_COMPILE_CACHE"] = COMPILE_CACHE


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
