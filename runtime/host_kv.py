"""Prefill K/V on its way off the device, one layer at a time.

    prefill (engine thread)         layer 0 ─ layer 1 ─ ... ─ layer L-1 ─ sample first token
    sender threads (one per row)       └─ copy 0 ─ send 0 ─┘└─ copy 1 ─ send 1 ─ ...  ─ trailer

The prefill dispatches each layer as its own device computation (model_runner), so layer i's
K/V is ready while layer i+1 still runs. `BatchHostKV`, on first use, starts every layer's
device-to-host copy (queued behind its computation) and hands out host arrays per layer, each
copied once and shared by all rows of the batch. `RowLayers` is the lazy per-layer sequence
that kv_wire.kv_chunks reads: indexing layer i waits for layer i only. `PrefilledRow` is one row
of a prefill batch's K/V as the prefill engine hands it to a sender (or a colocated insert).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np

from splitserve.runtime.kv_wire import select_original_heads


class BatchHostKV:
    def __init__(self, ks: Sequence, vs: Sequence):  # per layer [batch, seq, serving_kv_heads, head_dim]
        self._device = (tuple(ks), tuple(vs))
        self._host: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self._copies_started = False

    @property
    def num_layers(self) -> int:
        return len(self._device[0])

    def layer(self, which: int, index: int) -> np.ndarray:
        """K (which=0) or V (which=1) of one layer on the host; waits for that layer only."""
        key = (which, index)
        with self._lock:  # one copy per layer even when several rows' senders ask at once
            if not self._copies_started:  # on first use only: KV that stays on the device is never copied
                for layers in self._device:
                    for x in layers:
                        x.copy_to_host_async()
                self._copies_started = True
            if key not in self._host:
                self._host[key] = np.asarray(self._device[which][index])
            return self._host[key]


class RowLayers(Sequence):
    """One row's K or V per layer as host [length, model's kv_heads, head_dim] arrays, read lazily."""

    def __init__(self, batch: BatchHostKV, which: int, row: int, length: int, kv_source: Sequence[int]):
        self.batch, self.which, self.row, self.length = batch, which, row, length
        self.kv_source = tuple(kv_source)
        self._identity = self.kv_source == tuple(range(len(self.kv_source)))

    def __len__(self) -> int:
        return self.batch.num_layers

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        x = self.batch.layer(self.which, index)[self.row, : self.length]
        return x if self._identity else select_original_heads(x, self.kv_source)


@dataclasses.dataclass(frozen=True)
class PrefilledRow:
    """One row of a prefill batch's K/V, still on the device (serving head layout)."""

    ks: tuple  # per layer [batch, padded_seq, serving_kv_heads, head_dim]
    vs: tuple
    row: int
    length: int
    host: BatchHostKV | None = None  # shared by the batch's rows whose KV leaves this device

    def host_layers(self, kv_source) -> tuple[RowLayers, RowLayers]:
        """This row's K and V per layer, copied to the host lazily (BatchHostKV, RowLayers above)."""
        host = self.host or BatchHostKV(self.ks, self.vs)
        return (RowLayers(host, 0, self.row, self.length, kv_source),
                RowLayers(host, 1, self.row, self.length, kv_source))
