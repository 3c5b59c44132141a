"""Which prefill worker a prompt goes to when the prefill workers cache prefixes.

A prefix cache helps only if prompts that start alike reach the same worker. The router's plain
rule (the least loaded) spreads them over every worker, and each then computes the shared start
once more. So the router remembers, for each run of whole blocks that started a recent prompt,
which worker ran it. A new prompt goes to the worker of its longest remembered start when:
- that start covers at least half of the prompt's whole blocks (as SGLang's cache-aware router's
  threshold: a chat template's first block, shared by every chat, is no reason to pile them up);
- that worker still caches;
- it is busier than the least loaded worker by at most `slack` requests.
Otherwise the least loaded worker takes the prompt. Either way the chosen worker is remembered
for all of the prompt's blocks.

Blocks are remembered by a chained hash of their tokens: a collision only misroutes a prompt,
never changes its output (the worker's own index matches exact tokens).
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol, Sequence

# A prefill batch holds 8 by default: a worker 4 requests busier than another still runs the
# prompt in its next batch or the one after, and skips computing the shared start.
DEFAULT_SLACK = 4
DEFAULT_MAX_ENTRIES = 1 << 18  # remembered blocks (a few bytes each): thousands of long prompts
MAX_BLOCKS = 512  # of one prompt: beyond this a longer match changes nothing


class PrefillCandidate(Protocol):
    address: str
    in_flight: int
    prefix_cache_block: int  # 0: the worker has no prefix cache


class PrefixAffinity:
    def __init__(self, slack: int = DEFAULT_SLACK, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.slack = slack
        self.max_entries = max_entries
        self._worker_of: collections.OrderedDict[int, str] = collections.OrderedDict()  # block hash -> address
        self._lock = threading.Lock()

    def pick(self, prompt: Sequence[int], by_load: list[PrefillCandidate]) -> PrefillCandidate:
        """The worker for `prompt` among `by_load` (least loaded first, not empty)."""
        least = by_load[0]
        block = max(w.prefix_cache_block for w in by_load)
        if block == 0:
            return least  # no worker caches: the plain rule
        hashes = _block_hashes(prompt, block)
        if not hashes:
            return least  # no whole block before the last token: nothing to find
        with self._lock:
            matched, address = 0, None
            for h in hashes:
                found = self._worker_of.get(h)
                if found is None:
                    break
                matched, address = matched + 1, found
            chosen = least
            if 2 * matched >= len(hashes):
                chosen = next((w for w in by_load if w.address == address and w.prefix_cache_block
                               and w.in_flight <= least.in_flight + self.slack), least)
            if chosen.prefix_cache_block:
                for h in hashes:
                    self._worker_of[h] = chosen.address
                    self._worker_of.move_to_end(h)
                while len(self._worker_of) > self.max_entries:
                    self._worker_of.popitem(last=False)
        return chosen

    def forget(self, address: str) -> None:
        """A worker restarted: its cache is empty, so nothing should be sent there for it."""
        with self._lock:
            for h in [h for h, a in self._worker_of.items() if a == address]:
                del self._worker_of[h]


def _block_hashes(prompt: Sequence[int], block: int) -> list[int]:
    """Chained hashes of the whole blocks before the prompt's last token (a worker computes that one)."""
    hashes, h = [], 0
    for start in range(0, min(len(prompt) - 1, MAX_BLOCKS * block) - block + 1, block):
        h = hash((h, tuple(prompt[start:start + block])))
        hashes.append(h)
    return hashes
