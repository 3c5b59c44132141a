"""Shape buckets, so the number of compilations stays small and known.

Powers of two by default. `fine=True` adds the midpoint 1.5 x 2^k between powers
(8, 12, 16, 24, 32, ...): at most a third of padding instead of half, for twice the shapes.
"""

from __future__ import annotations

import numpy as np


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def bucket(n: int, *, minimum: int, maximum: int, fine: bool = False) -> int:
    """Smallest bucket >= n (at least `minimum`), capped at `maximum`."""
    if n > maximum:
        raise ValueError(f"{n} exceeds the largest bucket {maximum}")
    return next(size for size in all_buckets(minimum=minimum, maximum=maximum, fine=fine) if size >= n)


def all_buckets(*, minimum: int, maximum: int, fine: bool = False) -> list[int]:
    sizes, b = [], next_power_of_two(minimum)
    while b < maximum:
        sizes.append(b)
        if fine and b >= 2 and b * 3 // 2 < maximum:
            sizes.append(b * 3 // 2)
        b *= 2
    return sizes + [maximum]


def padded_rows(rows: list[list[int]], batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows padded to a (batch, seq) bucket: (i32[batch, seq] ids, zero-padded; i32[batch]
    lengths, 1 for padding rows)."""
    tokens = np.zeros((batch, seq), np.int32)
    lengths = np.ones((batch,), np.int32)
    for row, ids in enumerate(rows):
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return tokens, lengths
