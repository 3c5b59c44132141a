"""The router sends prompts that start alike to the prefill worker that ran the last such prompt,
within a slack of load, and only among workers that cache prefixes. On a launched stack with two
caching prefill workers: test_launched_stack_with_prefix_caching_equals_colocated_without in
tests/test_prefix_cache.py."""

from __future__ import annotations

import dataclasses

from splitserve.runtime.prefix_affinity import PrefixAffinity


@dataclasses.dataclass
class Worker:
    address: str
    in_flight: int = 0
    prefix_cache_block: int = 16


def by_load(*workers):
    return sorted(workers, key=lambda w: w.in_flight)


def test_a_shared_start_stays_on_its_worker_within_the_slack():
    a, b = Worker("a"), Worker("b")
    affinity = PrefixAffinity(slack=2)
    system = list(range(100, 148))  # 3 blocks
    assert affinity.pick(system + [1], by_load(a, b)) is a
    a.in_flight = 2  # b is less loaded, but within the slack
    assert affinity.pick(system + [2], by_load(a, b)) is a
    a.in_flight = 3  # past it: the least loaded takes it and is remembered
    assert affinity.pick(system + [3], by_load(a, b)) is b
    a.in_flight = b.in_flight = 0
    assert affinity.pick(system + [4], by_load(a, b)) is b
    # Another start goes by load alone.
    b.in_flight = 1
    assert affinity.pick(list(range(500, 540)), by_load(a, b)) is a


def test_a_match_shorter_than_half_the_prompt_goes_by_load():
    """Every chat starts with the same template block: that alone must not pile chats onto one worker."""
    a, b = Worker("a"), Worker("b")
    affinity = PrefixAffinity()
    template = list(range(16))
    assert affinity.pick(template + list(range(100, 148)), by_load(a, b)) is a  # 4 blocks remembered on a
    a.in_flight = 1
    assert affinity.pick(template + list(range(200, 248)), by_load(a, b)) is b  # 1 of 4 blocks: by load
    a.in_flight, b.in_flight = 1, 0
    assert affinity.pick(template + list(range(100, 132)) + [7] * 17, by_load(a, b)) is a  # 3 of 4: a


def test_no_affinity_without_a_cache_or_a_whole_block():
    a, b = Worker("a", prefix_cache_block=0), Worker("b", prefix_cache_block=0)
    affinity = PrefixAffinity()
    system = list(range(100, 130))
    affinity.pick(system, by_load(a, b))
    a.in_flight = 1
    assert affinity.pick(system, by_load(a, b)) is b  # least loaded: no worker caches
    a.prefix_cache_block = b.prefix_cache_block = 16
    assert affinity.pick(system[:16], by_load(a, b)) is b  # 16 tokens: no whole block before the last token
    # A remembered worker that stopped caching (restarted without it) is not preferred.
    affinity.pick(system, by_load(a, b))  # remembered: b
    b.prefix_cache_block, b.in_flight, a.in_flight = 0, 1, 0
    assert affinity.pick(system, by_load(a, b)) is a


def test_a_failover_is_remembered_and_a_restarted_worker_forgotten():
    a, b = Worker("a"), Worker("b")
    affinity = PrefixAffinity()
    system = list(range(100, 148))
    assert affinity.pick(system + [1], by_load(a, b)) is a
    assert affinity.pick(system + [2], [b]) is b  # a failed: the retry runs on b, which now holds the start
    assert affinity.pick(system + [3], by_load(a, b)) is b
    affinity.forget("b")  # b restarted with an empty cache
    a.in_flight = 1
    assert affinity.pick(system + [4], by_load(a, b)) is b  # by load; and remembered again
    affinity.pick(system + [5], by_load(a, b))
    assert set(affinity._worker_of.values()) == {"b"}


def test_the_memory_is_bounded():
    a, b = Worker("a"), Worker("b")
    affinity = PrefixAffinity(max_entries=3)
    for start in range(10):
        affinity.pick([start] * 20, by_load(a, b))
    assert len(affinity._worker_of) == 3

