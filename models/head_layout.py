"""How attention heads are laid out for a given tensor-parallel degree.

TP shards query and KV heads over devices. When TP does not divide the KV heads
(e.g. 2 KV heads on tp=4, or 3 on tp=2), each KV head is replicated `r` times so the
replicated count, lcm(kv_heads, tp), divides evenly. Each replica serves a contiguous
share of its group's query heads; if the group does not split evenly, zero query heads
are padded in (their o_proj rows are zero, so they add nothing to the output).

    original: kv0: q0 q1 q2 | kv1: q3 q4 q5                (kv=2, group=3, tp=4)
    serving:  kv0a: q0 q1 | kv0b: q2 -- | kv1a: q3 q4 | kv1b: q5 --
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    q_source: tuple[int, ...]  # serving query head -> original head, -1 for a zero pad head
    kv_source: tuple[int, ...]  # serving KV head -> original KV head

    @property
    def num_heads(self) -> int:
        return len(self.q_source)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_source)

    @property
    def is_identity(self) -> bool:
        return self.q_source == tuple(range(len(self.q_source))) and self.kv_source == tuple(
            range(len(self.kv_source))
        )


def head_layout_for(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    group = num_heads // num_kv_heads
    serving_kv = num_kv_heads if num_kv_heads % tp == 0 else math.lcm(num_kv_heads, tp)
    replicas = serving_kv // num_kv_heads
    per_replica = math.ceil(group / replicas)
    q_source: list[int] = []
    kv_source: list[int] = []
    for kv in range(num_kv_heads):
        for r in range(replicas):
            kv_source.append(kv)
            for i in range(per_replica):
                within = r * per_replica + i
                q_source.append(kv * group + within if within < group else -1)
    return HeadLayout(tuple(q_source), tuple(kv_source))
