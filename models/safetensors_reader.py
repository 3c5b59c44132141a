"""Reads named tensors from an HF directory's safetensors shards, one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

# Weights are stored in one of these; anything else (int8 codes, fp8) needs a dequantisation
# this loader does not do, and cast as they are they would give garbage.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


class SafetensorsReader:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
            weight_map = None
        self._handles = {f: safe_open(str(model_dir / f), framework="numpy") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def get(self, name: str) -> np.ndarray:
        if name not in self._weight_map:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        tensor = self._handles[self._weight_map[name]].get_tensor(name)
        if tensor.dtype.name not in WEIGHT_DTYPES:
            raise ValueError(f"tensor {name!r} is stored as {tensor.dtype.name}; only {', '.join(WEIGHT_DTYPES)} "
                             "weights can be loaded (quantized checkpoints are not supported)")
        return tensor
