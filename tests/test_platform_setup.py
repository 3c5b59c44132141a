"""--platform names to JAX_PLATFORMS: "gpu" must select CUDA alone (JAX_PLATFORMS=gpu also tries ROCm,
and that fails on an NVIDIA machine whose JAX has no ROCm plugin, as seen on an H200)."""

import os

import pytest

from splitserve.runtime.platform_setup import configure_jax, jax_platforms


@pytest.mark.parametrize("platform, expected", [("gpu", "cuda"), ("cuda", "cuda"), ("tpu", "tpu"), ("cpu", "cpu")])
def test_jax_platforms(platform, expected):
    assert jax_platforms(platform) == expected


def test_configure_jax_sets_cuda_for_gpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("SPLITSERVE_COMPILE_CACHE", "off")
    configure_jax("gpu")
    assert os.environ["JAX_PLATFORMS"] == "cuda"


def test_the_cli_imports_no_jax_before_configure_jax(tmp_path):
    """JAX reads JAX_PLATFORMS and its compile-cache settings once, at import: the CLI modules
    imported it (through MeshConfig) before configure_jax ran, so --platform and the compile
    cache never reached the workers; a restart compiled everything again."""
    import subprocess
    import sys

    code = ("import sys; import splitserve.runtime.cli, splitserve.runtime.cli_serve, splitserve.runtime.launch, "
            "splitserve.runtime.cli_demo; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    cache = tmp_path / "cache"  # and a real run writes its compiled programs there
    env = dict(os.environ, SPLITSERVE_CACHE=str(cache), JAX_PLATFORMS="")
    env.pop("SPLITSERVE_COMPILE_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "generate", "--prompt-ids", "5,6,7",
                          "--max-tokens", "2", "--platform", "cpu"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert any((cache / "jax-compile").iterdir())


def test_a_stop_while_starting_that_the_start_swallowed_still_exits():
    """The raise lands where Python ignores exceptions (here a bare except, as in a destructor);
    with exit_after_s the process exits all the same, with the signal's status and a message."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, signal, sys, time\n"
        "from splitserve.runtime.platform_setup import stop_on_signals\n"
        "stop = stop_on_signals(exit_after_s=0.5)\n"
        "end = time.monotonic() + 30\n"
        "told = False\n"
        "while True:\n"  # every statement inside the try, the print too: the raise may land on any of them
        "    try:\n"
        "        if not told:\n"
        "            print('starting', flush=True)\n"
        "            told = True\n"
        "        while time.monotonic() < end:\n"
        "            time.sleep(0.01)\n"
        "        break\n"
        "    except BaseException:\n"
        "        pass  # swallowed: the start goes on\n"
        "print('started anyway', flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "starting\n"
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 128 + signal.SIGTERM and time.monotonic() - sent < 5, err
    assert "started anyway" not in out and "SIGTERM while starting, and the start went on" in err
