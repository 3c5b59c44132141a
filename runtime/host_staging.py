"""Reusable host buffers for received KV.

Every transfer used to land in freshly allocated arrays, and on these hosts first-touch page
faults made that copy run at ~0.4 GB/s instead of ~4 GB/s into memory already mapped
(scripts/bench/RESULTS.md). The decode worker therefore takes its receive buffers from this
pool and gives them back once their KV is in the device cache. Shapes are bucketed by the
caller (padded token counts), so a few shapes cover every request.

Bounded: at most `max_free_bytes` of idle buffers are kept; beyond that they are dropped.
Thread-safe: gRPC threads take, the engine thread gives back.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict

import numpy as np


class StagingPool:
    def __init__(self, max_free_bytes: int):
        if max_free_bytes < 0:
            raise ValueError(f"max_free_bytes must be >= 0, got {max_free_bytes}")
        self.max_free_bytes = max_free_bytes
        self._free: dict[tuple, list[np.ndarray]] = defaultdict(list)
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._ours: dict[int, weakref.ref] = {}  # id -> buffer, for every live buffer this pool made
        self.reused = self.allocated = 0  # counters, for tests and logs

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An array of this shape and dtype with unspecified contents."""
        key = (tuple(shape), np.dtype(dtype))
        with self._lock:
            if self._free[key]:
                array = self._free[key].pop()
                self._free_bytes -= array.nbytes
                self.reused += 1
                return array
            self.allocated += 1
            array = np.empty(*key)
            self._ours[id(array)] = weakref.ref(array, lambda _, key=id(array): self._ours.pop(key, None))
            return array

    def owns(self, array) -> bool:
        """True for a buffer this pool made (so it is writable and may be recycled)."""
        with self._lock:
            return self._is_ours(array)

    def _is_ours(self, array) -> bool:
        ref = self._ours.get(id(array))
        return ref is not None and ref() is array

    def give_back(self, arrays) -> None:
        """Returns buffers from `take`; the caller must not touch them afterwards. Arrays this pool
        did not make are ignored."""
        with self._lock:
            for array in arrays:
                if not self._is_ours(array):
                    continue
                if self._free_bytes + array.nbytes > self.max_free_bytes:
                    continue  # over the bound: let it be freed
                self._free[(array.shape, array.dtype)].append(array)
                self._free_bytes += array.nbytes

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._free_bytes
