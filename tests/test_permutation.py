"""KeyedPermutation: a bijection of [0, n) for every n, chosen by its key, evenly shuffled."""

import numpy as np
import pytest

from m6_engine.data.permutation import KeyedPermutation


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 1000, 4097])
def test_is_a_bijection_of_the_range(n):
    perm = KeyedPermutation(n, [7, 1, 2])
    values = [perm[k] for k in range(n)]
    assert sorted(values) == list(range(n))
    assert [perm[k] for k in range(n)] == values           # a function of (key, k) only
    with pytest.raises(IndexError):
        perm[n]


def test_keys_choose_different_orders_that_look_uniform():
    n, keys = 10, 3000
    firsts = np.bincount([KeyedPermutation(n, [0, key])[0] for key in range(keys)], minlength=n)
    # each value is perm[0] for ~300 of the keys: a chi-square with 9 degrees of freedom stays far below 40
    expected = keys / n
    assert ((firsts - expected) ** 2 / expected).sum() < 40, firsts
    orders = {tuple(KeyedPermutation(1000, [0, e])[k] for k in range(20)) for e in range(50)}
    assert len(orders) == 50                                # every epoch its own shuffle
    perm = KeyedPermutation(1000, [3])
    moved = [perm[k] - k for k in range(999)]
    assert abs(np.corrcoef(range(999), [perm[k] for k in range(999)])[0, 1]) < 0.1   # no trend
    assert len(set(moved)) > 650    # ~740 distinct shifts for a uniform random permutation; a rotation has 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="n >= 1"):
        KeyedPermutation(0, [1])
    with pytest.raises(ValueError, match=">= 0"):
        KeyedPermutation(4, [-1])
