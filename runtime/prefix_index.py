"""Which prompt prefixes have their KV cached, and in which pages: the host side of prefix caching.

A prompt is cut into blocks of `block_size` tokens. A block is known by its parent block and its
own tokens, so a block matches only when the whole prompt before it matches too (vLLM's chained
block hashes; here the key holds the tokens themselves, so two different prefixes never share an
entry however their hashes would collide). Each cached block owns one page of the device pool
(runtime/prefix_cache.py); page 0 is the pool's sink and never handed out.

Eviction is least recently used. Using a chain touches its blocks from the last to the first, so
a parent is always more recent than its children and the oldest entry is a leaf; evicting an entry
evicts whatever hangs below it anyway, so no entry is ever left unreachable.

Not thread-safe: one prefill loop owns it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

_ROOT = 0


@dataclasses.dataclass
class _Block:
    node_id: int
    key: tuple  # (parent node id, the block's tokens)
    page: int
    children: set = dataclasses.field(default_factory=set)  # node ids


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """The cached leading blocks of one prompt: their pages in order, and the tokens they hold."""

    pages: tuple[int, ...]
    tokens: int


@dataclasses.dataclass(frozen=True)
class NewBlocks:
    """Blocks of one prompt that a store took into the cache: block `first_block + i` goes to `pages[i]`."""

    first_block: int
    pages: tuple[int, ...]


class PrefixIndex:
    def __init__(self, num_pages: int, block_size: int):
        if num_pages < 2:
            raise ValueError(f"a prefix cache needs at least 2 pages (page 0 is the sink), got {num_pages}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.capacity = num_pages - 1
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out page 1 first
        self._by_key: dict[tuple, _Block] = {}
        self._by_id: dict[int, _Block] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self._ids = itertools.count(_ROOT + 1)

    def __len__(self) -> int:
        return len(self._by_id)

    def _blocks(self, prompt, count: int):
        b = self.block_size
        return (tuple(prompt[i * b:(i + 1) * b]) for i in range(count))

    def _chain(self, prompt, count: int) -> list[_Block]:
        """The cached blocks that start `prompt`, at most `count` of them."""
        chain, parent = [], _ROOT
        for tokens in self._blocks(prompt, count):
            block = self._by_key.get((parent, tokens))
            if block is None:
                break
            chain.append(block)
            parent = block.node_id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # the first block ends up the most recent
            self._lru.move_to_end(block.node_id)

    def lookup(self, prompt) -> PrefixHit:
        """The longest cached run of whole blocks that starts `prompt`, leaving at least its last
        token to compute (the first output token comes from that token's logits)."""
        chain = self._chain(prompt, (len(prompt) - 1) // self.block_size)
        self._touch(chain)
        return PrefixHit(tuple(b.page for b in chain), len(chain) * self.block_size)

    def store(self, prompt, protected: set[int]) -> NewBlocks | None:
        """Takes the whole blocks of `prompt` that are not cached yet; evicts old entries for room but
        never a page in `protected` (pages a caller is about to write: this call adds its own) nor the
        prompt's own cached blocks. None when nothing new was taken."""
        count = len(prompt) // self.block_size
        chain = self._chain(prompt, count)
        self._touch(chain)
        keep = protected | {b.page for b in chain}  # what eviction must leave alone
        first_new = len(chain)
        parent = chain[-1].node_id if chain else _ROOT
        new_pages = []
        try:
            for tokens in itertools.islice(self._blocks(prompt, count), first_new, None):
                page = self._take_page(keep)
                if page is None:
                    break  # no room: everything left is in use by this write
                block = _Block(next(self._ids), (parent, tokens), page)
                self._by_key[block.key] = block
                self._by_id[block.node_id] = block
                if parent != _ROOT:
                    self._by_id[parent].children.add(block.node_id)
                self._lru[block.node_id] = None
                chain.append(block)
                keep.add(page)
                protected.add(page)
                new_pages.append(page)
                parent = block.node_id
        except BaseException:  # the caller will not write these pages: no entry may claim them
            if len(chain) > first_new:
                self._evict(chain[first_new].node_id)
            protected.difference_update(new_pages)
            raise
        self._touch(chain)
        return NewBlocks(first_new, tuple(new_pages)) if new_pages else None

    def _take_page(self, protected: set[int]) -> int | None:
        if not self._free:
            victim = next((i for i in self._lru if protected.isdisjoint(self._subtree_pages(i))), None)
            if victim is None:
                return None
            self._evict(victim)
        return self._free.pop()

    def _subtree(self, node_id: int) -> list[_Block]:
        """The block and every block below it (iterative: a chain can be thousands of blocks deep)."""
        found, stack = [], [node_id]
        while stack:
            block = self._by_id[stack.pop()]
            found.append(block)
            stack.extend(block.children)
        return found

    def _subtree_pages(self, node_id: int) -> set[int]:
        return {b.page for b in self._subtree(node_id)}

    def _evict(self, node_id: int) -> None:
        subtree = self._subtree(node_id)
        parent = self._by_id.get(subtree[0].key[0])
        if parent is not None:
            parent.children.discard(node_id)
        for block in subtree:
            del self._by_id[block.node_id]
            del self._by_key[block.key]
            del self._lru[block.node_id]
            self._free.append(block.page)
