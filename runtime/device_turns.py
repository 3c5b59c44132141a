"""Turns on one device for the engines that share it, first come first served.

A colocated worker runs a prefill engine thread and a decode engine thread on the same runner.
On a CPU two XLA programs running at once split the same cores (one thread pool): both run at
about half speed, and the decode engine then steps many more times on small batches while the
prompts crawl in. Measured on a 2-core CPU, 64 requests (scripts/bench/RESULTS.md, "Colocated
worker takes turns"): prefills took 5.4 s overlapped with decode against 2.7 s alone, and the
decode engine made 115 steps where 55 suffice. Taking turns puts each program on the whole
machine, and first come first served alternates the two engines when both are busy (a prefill
batch, a decode step, ...), as the colocated engine's own step does, so neither starves.

A GPU or TPU already runs programs one after another on its stream, so the worker takes turns
only on a CPU (runtime/worker.py).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class DeviceTurns:
    """A lock granted in the order it was asked for (a ticket lock)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    @property
    def waiting(self) -> int:
        """Threads waiting for a turn (not counting the one that has it)."""
        with self._changed:
            return max(0, self._next_ticket - self._now_serving - 1)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._now_serving:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._now_serving += 1
                self._changed.notify_all()


@contextlib.contextmanager
def no_turns() -> Iterator[None]:
    """For an engine that has the device to itself."""
    yield
