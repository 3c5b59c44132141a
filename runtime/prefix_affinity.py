"""Which prefill worker a prompt goes to when the prefill workers cache prefixes.

A prefix cache helps only if prompts that start alike reach the same worker. The router's plain
rule (the least loaded) spreads them over every worker, and each then computes the shared start
once more. So the router remembers which worker last ran a prompt that starts with the same first
block of tokens and sends the next one there, unless that worker is busier than the least loaded
by more than `slack` requests (then the least loaded takes it, and becomes the one remembered).
Like SGLang's cache-aware router, this trades a little balance for hits; unlike it, it keys on
the first block only, which is where system prompts and few-shot examples sit.
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol, Sequence

# A prefill batch holds 8 by default: a worker 4 requests busier than another still runs the
# prompt in its next batch or the one after, and skips computing the shared start.
DEFAULT_SLACK = 4
DEFAULT_MAX_ENTRIES = 1 << 16


class PrefillCandidate(Protocol):
    address: str
    in_flight: int
    prefix_cache_block: int  # 0: the worker has no prefix cache


class PrefixAffinity:
    def __init__(self, slack: int = DEFAULT_SLACK, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.slack = slack
        self.max_entries = max_entries
        self._last: collections.OrderedDict[tuple, str] = collections.OrderedDict()  # first block -> address
        self._lock = threading.Lock()

    def pick(self, prompt: Sequence[int], by_load: list[PrefillCandidate]) -> PrefillCandidate:
        """The worker for `prompt` among `by_load` (least loaded first, not empty)."""
        least = by_load[0]
        block = max(w.prefix_cache_block for w in by_load)
        if len(by_load) < 2 or block == 0 or len(prompt) <= block:
            return least  # nothing to share: no cache, or no whole block to find
        key = tuple(prompt[:block])
        with self._lock:
            address = self._last.get(key)
            chosen = next((w for w in by_load if w.address == address and w.prefix_cache_block
                           and w.in_flight <= least.in_flight + self.slack), least)
            self._last[key] = chosen.address
            self._last.move_to_end(key)
            while len(self._last) > self.max_entries:
                self._last.popitem(last=False)
        return chosen
