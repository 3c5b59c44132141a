"""Reads named tensors from an HF directory's safetensors shards, one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

# Weights are stored in one of these; anything else (int8 codes, fp8) needs a dequantisation
# this loader does not do, and cast as they are they would give garbage.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


class SafetensorsReader:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: not an index of tensors to files ({type(e).__name__}: {e})") from None
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
            weight_map = None
        self._handles = {f: _open(model_dir / f) for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def names(self) -> list[str]:
        return list(self._weight_map)

    def get(self, name: str) -> np.ndarray:
        if name not in self._weight_map:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint")
        file = self._weight_map[name]
        try:
            tensor = self._handles[file].get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: tensor {name!r} does not load ({e})") from None
        if tensor.dtype.name not in WEIGHT_DTYPES:
            raise ValueError(f"tensor {name!r} is stored as {tensor.dtype.name}; only {', '.join(WEIGHT_DTYPES)} "
                             "weights can be loaded (quantized checkpoints are not supported)")
        return tensor


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint names this file, but it is not there")
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:  # truncated, empty, a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
