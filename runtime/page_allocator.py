"""Hands out KV-cache pages and takes them back. Plain Python: no JAX here.

Page 0 is the sink page (models/kv_cache.py) and is never handed out.
"""

from __future__ import annotations


class OutOfPages(Exception):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._in_use: set[int] = set()

    @property
    def capacity(self) -> int:
        """Pages a request can ever get: all but the sink."""
        return self.num_pages - 1

    @property
    def free_count(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPages(f"requested {count} pages, {len(self._free)} free of {self.capacity}")
        pages = [self._free.pop() for _ in range(count)]
        self._in_use.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._in_use:
                raise ValueError(f"page {page} is not allocated (double free or foreign page)")
            self._in_use.remove(page)
            self._free.append(page)


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)
