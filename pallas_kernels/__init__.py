"""Attention kernels: Pallas TPU and GPU versions and plain-JAX references.

Public entry points (see shared/INTERFACES.md): `flash_attention` (prefill) and
`paged_attention` (decode). Each validates its inputs, then dispatches on `impl`:

    "tpu"        Pallas Mosaic TPU kernels (flash_tpu.py, paged_tpu.py); on a CPU they
                 run under `pltpu.force_tpu_interpret_mode(...)`
    "gpu"        Pallas GPU kernels, Triton lowering (flash_gpu.py, paged_gpu.py)
    "xla"        plain JAX written for XLA's CPU backend: paged attention walks a flat list
                 of the page chunks that hold tokens, so a long row costs only itself
                 (paged_xla.py); prefill attention is the reference's arithmetic a block of
                 queries at a time, causal blocks reading only the keys before them (flash_xla.py)
    "reference"  plain JAX (reference.py), the ground truth
    "auto"       by jax.default_backend(): tpu -> "tpu", gpu -> "gpu", else "reference";
                 paged attention on a GPU with a page size that is not a power of two (the
                 Triton kernel cannot tile it) -> "xla"

Block-size tunables are keyword arguments of the per-backend functions; the public
functions use their defaults.
"""

import jax

from splitserve.pallas_kernels.flash_gpu import flash_attention_gpu
from splitserve.pallas_kernels.flash_tpu import flash_attention_tpu
from splitserve.pallas_kernels.flash_xla import flash_attention_xla
from splitserve.pallas_kernels.paged_gpu import paged_attention_gpu
from splitserve.pallas_kernels.paged_tpu import paged_attention_tpu
from splitserve.pallas_kernels.paged_xla import paged_attention_xla
from splitserve.pallas_kernels.reference import (
    flash_attention_reference,
    paged_attention_reference,
)
from splitserve.pallas_kernels.validation import check_flash_args, check_paged_args

_BACKEND_IMPL = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def resolve_impl(impl: str, *, page_size: int | None = None) -> str:
    """Maps "auto" to the implementation for the default JAX backend (`page_size`: of a paged call)."""
    if impl != "auto":
        return impl
    return gpu_fallback(_BACKEND_IMPL.get(jax.default_backend(), "reference"), page_size)


def gpu_fallback(impl: str, page_size: int | None) -> str:
    """"xla" for a paged call the GPU kernel cannot take (page size not a power of two), else `impl`."""
    if impl == "gpu" and page_size is not None and page_size & (page_size - 1):
        return "xla"
    return impl


def flash_attention(q, k, v, *, lengths=None, causal=True, sm_scale=None, impl="auto", q_offsets=None):
    """Prefill attention. q [batch, q_seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim].

    `q_offsets` i32[batch] (optional): row r's query i sits at position q_offsets[r] + i of its
    keys, as for the tokens after a cached prefix; keys are valid below `lengths`. Without it,
    q_seq == seq and queries start at position 0.
    """
    check_flash_args(q, k, v, lengths, sm_scale, impl, causal, q_offsets)
    impl = resolve_impl(impl)
    kwargs = dict(causal=causal, sm_scale=sm_scale, q_offsets=q_offsets)
    if impl == "tpu":
        return flash_attention_tpu(q, k, v, lengths, **kwargs)
    if impl == "gpu":
        return flash_attention_gpu(q, k, v, lengths, **kwargs)
    if impl == "xla":
        return flash_attention_xla(q, k, v, lengths, **kwargs)
    return flash_attention_reference(q, k, v, lengths=lengths, **kwargs)


def paged_attention(q, k_pages, v_pages, lengths, page_indices, *, sm_scale=None, impl="auto"):
    """Decode attention. q [batch, heads, head_dim], pages [kv_heads, total_pages, page_size, head_dim]."""
    check_paged_args(q, k_pages, v_pages, lengths, page_indices, sm_scale, impl)
    impl = resolve_impl(impl, page_size=k_pages.shape[2])
    args = (q, k_pages, v_pages, lengths, page_indices)
    if impl == "tpu":
        return paged_attention_tpu(*args, sm_scale=sm_scale)
    if impl == "gpu":
        return paged_attention_gpu(*args, sm_scale=sm_scale)
    if impl == "xla":
        return paged_attention_xla(*args, sm_scale=sm_scale)
    return paged_attention_reference(*args, sm_scale=sm_scale)


__all__ = [
    "flash_attention",
    "paged_attention",
    "flash_attention_reference",
    "paged_attention_reference",
    "flash_attention_tpu",
    "paged_attention_tpu",
    "flash_attention_gpu",
    "paged_attention_gpu",
    "paged_attention_xla",
    "flash_attention_xla",
    "resolve_impl",
    "gpu_fallback",
]
