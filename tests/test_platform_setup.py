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
