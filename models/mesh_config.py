"""A worker's mesh as the CLI gives it ("tp=N"). No JAX here: the CLI parses it before
configure_jax() has set JAX's platform and compile cache, which JAX reads once, at import."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    tp: int = 1

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """Parses 'tp=4' (the CLI's --prefill-mesh / --decode-mesh syntax)."""
        match = re.fullmatch(r"\s*tp\s*=\s*(\d+)\s*", text or "tp=1")
        if not match:
            raise ValueError(f"mesh spec {text!r} is not of the form 'tp=N'")
        return cls(tp=int(match.group(1)))
