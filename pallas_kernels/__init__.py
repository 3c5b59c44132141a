"""Attention kernels: Pallas TPU and GPU versions and plain-JAX references.

Public entry points (see shared/INTERFACES.md): `flash_attention` and `paged_attention`.
"""

from splitserve.pallas_kernels.reference import (
    flash_attention_reference,
    paged_attention_reference,
)


def flash_attention(q, k, v, *, lengths=None, causal=True, sm_scale=None, impl="auto"):
    """Causal prefill attention. Until the Pallas versions land, every impl is the reference."""
    return flash_attention_reference(q, k, v, lengths=lengths, causal=causal, sm_scale=sm_scale)


def paged_attention(q, k_pages, v_pages, lengths, page_indices, *, sm_scale=None, impl="auto"):
    """Decode attention over a paged cache. Until the Pallas versions land, the reference."""
    return paged_attention_reference(q, k_pages, v_pages, lengths, page_indices, sm_scale=sm_scale)


__all__ = [
    "flash_attention",
    "paged_attention",
    "flash_attention_reference",
    "paged_attention_reference",
]
