"""Shape buckets: every size fits the smallest bucket that holds it, fine buckets at 1.5x steps."""

import pytest

from splitserve.runtime.buckets import all_buckets, bucket


def test_power_of_two_buckets():
    assert all_buckets(minimum=8, maximum=128) == [8, 16, 32, 64, 128]
    assert [bucket(n, minimum=8, maximum=128) for n in (1, 8, 9, 16, 17, 100, 128)] == [8, 8, 16, 16, 32, 128, 128]


def test_fine_buckets_add_the_midpoints():
    assert all_buckets(minimum=8, maximum=128, fine=True) == [8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert all_buckets(minimum=1, maximum=10, fine=True) == [1, 2, 3, 4, 6, 8, 10]  # capped, max kept


@pytest.mark.parametrize("fine", [False, True])
def test_bucket_is_the_smallest_that_holds_n(fine):
    sizes = all_buckets(minimum=4, maximum=100, fine=fine)
    for n in range(1, 101):
        chosen = bucket(n, minimum=4, maximum=100, fine=fine)
        assert chosen in sizes and chosen >= n
        assert all(s < n for s in sizes if s < chosen)
    with pytest.raises(ValueError, match="exceeds the largest bucket 100"):
        bucket(101, minimum=4, maximum=100, fine=fine)
