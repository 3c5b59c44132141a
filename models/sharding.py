"""Logical axis names -> mesh axes: the one table that says how arrays are sharded.

Prefill and decode meshes differ by their mesh (and so by these rules), never by copies
of the model. A logical axis whose size the mesh axis does not divide is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from splitserve.models.mesh_config import MeshConfig  # noqa: F401 - imported from here too

# Logical axis -> mesh axis ("tp") or None (replicated).
TP_RULES: dict[str, str | None] = {
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "batch": None,
    "seq": None,
    "pages": None,
    "page_slot": None,
}


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < config.tp:
        raise ValueError(
            f"mesh tp={config.tp} needs {config.tp} devices but only {len(devices)} are visible "
            f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={config.tp})"
        )
    return Mesh(np.array(devices[: config.tp]), ("tp",))


def partition_spec(logical_axes, shape, mesh: Mesh, rules=TP_RULES) -> PartitionSpec:
    spec = []
    for name, size in zip(logical_axes, shape):
        axis = rules.get(name) if name else None
        if axis is not None and size % mesh.shape[axis] != 0:
            axis = None  # e.g. a vocab of 32003 on tp=4: replicate rather than fail
        spec.append(axis)
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh, rules=TP_RULES) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(logical_axes, shape, mesh, rules))
