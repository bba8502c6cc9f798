"""The dropout keep mask of ``m6::prefix_lm_attention`` recomputed in numpy: the test oracle.

The kernel's rule (csrc/attention/prefix_lm_attention.h): element (b, h, i, j) of the (B, H, Sq, Sk)
probabilities is kept iff ``lowbias32(row_key + j) >= floor(p * 2^32)``, with
``row_key = splitmix64(seed + row * 0x9E3779B97F4A7C15) >> 32`` and row = (b * H + h) * Sq + i.
Written independently of the C++ (numpy's wrapping uint64 / uint32 arithmetic), so a test comparing
the op's output with the reference attention under this mask checks the exact bits.
"""

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def keep_mask(seed: int, shape: tuple, dropout_p: float) -> torch.Tensor:
    """The (B, H, Sq, Sk) boolean keep mask the kernel draws for ``seed`` and ``dropout_p``."""
    b, h, sq, sk = shape
    with np.errstate(over="ignore"):
        rows = np.arange(b * h * sq, dtype=np.uint64)
        keys = (_splitmix64(np.uint64(seed) + rows * _GOLDEN) >> np.uint64(32)).astype(np.uint32)
        bits = _lowbias32(keys[:, None] + np.arange(sk, dtype=np.uint32)[None, :])
    threshold = np.uint32(int(dropout_p * 4294967296.0))
    return torch.from_numpy(bits >= threshold).view(b, h, sq, sk)
