"""Shape buckets, so the number of compilations stays small and known."""

from __future__ import annotations


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def bucket(n: int, *, minimum: int, maximum: int) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at `maximum`."""
    if n > maximum:
        raise ValueError(f"{n} exceeds the largest bucket {maximum}")
    return min(next_power_of_two(n, minimum), maximum)


def all_buckets(*, minimum: int, maximum: int) -> list[int]:
    sizes, b = [], next_power_of_two(minimum)
    while b < maximum:
        sizes.append(b)
        b *= 2
    return sizes + [maximum]
