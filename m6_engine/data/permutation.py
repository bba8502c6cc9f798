"""A keyed pseudo-random permutation of ``0 .. n-1`` evaluated one element at a time, in O(1).

The training dataset visits each source's documents once per epoch in a shuffled order. Drawing
that order with ``rng.permutation(n)`` would make every rank hold an ``n``-element array (80 MB
for 10M documents) and spend O(n) before its first sample, at start-up and at every epoch; a
permutation that answers "which document is draw ``k``?" directly costs neither.

:class:`KeyedPermutation` is a balanced Feistel network on ``2h`` bits (``4^h >= n``, the smallest
such ``h``) whose round function is the splitmix64 finaliser keyed per round, restricted to
``[0, n)`` by cycle walking: a value that lands outside is encrypted again until it lands inside,
which keeps the map a bijection of ``[0, n)`` (the domain is under ``4n``, so fewer than four
rounds of walking are expected). Six rounds: a Feistel network with four or more rounds of a
pseudo-random function is a strong pseudo-random permutation (Luby-Rackoff), the margin is cheap.

The round keys come from a ``numpy.random.SeedSequence`` of the caller's words (seed, source,
epoch), so the order is the same in every process and on every platform.
"""

from typing import Sequence

import numpy as np

ROUNDS = 6
_MASK64 = (1 << 64) - 1


_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit mix in which every input bit reaches every output bit."""
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """:func:`_mix64` of every element of a uint64 array (wrapping multiplication)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(_MIX1)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(_MIX2)
        return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """``perm[k]`` for ``k`` in ``[0, n)``: a bijection of ``[0, n)`` chosen by ``key`` (module doc)."""

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"KeyedPermutation needs n >= 1, got {n}")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = (1 << self._half) - 1
        words = [int(w) for w in key]
        if any(w < 0 for w in words):
            raise ValueError(f"KeyedPermutation key words must be >= 0, got {words}")
        self._round_keys = [int(k) for k in np.random.SeedSequence(words).generate_state(ROUNDS, np.uint64)]

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for round_key in self._round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & self._mask)
        return (left << self._half) | right

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < self.n:
            raise IndexError(f"permutation index {k} is not in [0, {self.n})")
        x = self._encrypt(k)
        while x >= self.n:  # cycle walking: stays on k's cycle, so the restriction is a bijection
            x = self._encrypt(x)
        return x
