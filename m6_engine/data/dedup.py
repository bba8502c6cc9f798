"""Exact and near-duplicate detection: content hashes, MinHash over character shingles, LSH banding.

Both texts are first normalised (:func:`normalize`: lower-case, whitespace removed), so copies that
differ only in spacing or case count as the same.

* Exact: :func:`exact_key` is a 128-bit BLAKE2b digest of the normalised text.
* Near: the Jaccard similarity J(A, B) = |A ∩ B| / |A ∪ B| of the two texts' sets of character
  k-shingles (k = ``shingle_size``, default 5) is estimated by MinHash: for ``num_perm`` hash
  functions h_p, P[min h_p(A) = min h_p(B)] = J(A, B), so the fraction of equal signature entries
  estimates J. A shingle is hashed to 64 bits (polynomial over its code points, then the splitmix64
  finaliser); h_p(x) = (a_p * x + b_p mod 2^64) >> 32 with a_p odd (multiply-shift hashing), the
  (a_p, b_p) drawn from ``seed``: signatures are deterministic across runs, processes and machines.
* LSH banding: the signature is cut into ``bands`` bands of r = num_perm / bands rows; two texts
  become candidates when any band matches exactly, which happens with probability
  1 - (1 - J^r)^bands (an S-curve, ≈ 0.95 at J = 0.8 for 16 x 8). Candidates are confirmed when
  the estimated J >= ``threshold``, so the banding only decides which pairs are compared.

:class:`NearDuplicateIndex` keeps the signatures of the documents kept so far: about
4 * num_perm bytes (512 B) plus one dict entry per band per document.
"""

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from m6_engine.data.permutation import splitmix64

_POLY = np.uint64(0x100000001B3)  # odd multiplier of the rolling shingle hash
_BLOCK = 4096  # shingles hashed per block: bounds the (block, num_perm) temporary to 4 MiB


@dataclass(frozen=True)
class DedupConfig:
    """Exact and near-duplicate removal settings."""

    exact: bool = True
    """Drop a document whose normalised text equals an earlier one's."""
    near: bool = True
    """Drop a document whose estimated shingle Jaccard with an earlier one is >= threshold."""
    shingle_size: int = 5
    """Characters per shingle."""
    num_perm: int = 128
    """MinHash signature length."""
    bands: int = 16
    """LSH bands; must divide num_perm."""
    threshold: float = 0.8
    """Estimated Jaccard at or above which a document is a near duplicate."""
    seed: int = 0
    """Seed of the MinHash hash functions."""

    def __post_init__(self):
        if self.shingle_size < 1 or self.num_perm < 1 or self.bands < 1:
            raise ValueError("DedupConfig: shingle_size, num_perm and bands must be >= 1")
        if self.num_perm % self.bands:
            raise ValueError(f"DedupConfig: bands ({self.bands}) must divide num_perm ({self.num_perm})")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"DedupConfig: threshold must be in (0, 1], got {self.threshold}")


def normalize(text: str) -> str:
    """Lower-case and drop all whitespace: the form both duplicate tests compare."""
    return "".join(text.lower().split())


def exact_key(text: str) -> bytes:
    """16-byte digest of the normalised text."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """64-bit hashes of the character k-shingles of the normalised text, in text order.

    A repeated shingle is hashed again rather than removed: a minimum does not change, and
    sorting out the repeats would cost more than hashing them. A text shorter than k is one
    shingle; an empty text has none.
    """
    cps = np.frombuffer(normalize(text).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    n = len(cps)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    k = min(k, n)
    m = n - k + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):  # h = sum_j cp[i + j] * POLY^(k - 1 - j)  (mod 2^64)
            h = h * _POLY + cps[j:j + m]
        return splitmix64(h)


class MinHasher:
    """MinHash signatures (``num_perm`` uint32 values) of texts; see the module docstring."""

    def __init__(self, config: DedupConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self._a = rng.integers(0, 2**63, size=config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=config.num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32; all 0xFFFFFFFF for a text without shingles."""
        x = shingle_hashes(text, self.config.shingle_size)
        sig = np.full(self.config.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(x), _BLOCK):
                block = x[start:start + _BLOCK, None]  # (block, 1)
                hashed = (block * self._a + self._b) >> np.uint64(32)  # (block, num_perm)
                np.minimum(sig, hashed.min(axis=0), out=sig)
        return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash entries: an unbiased estimate of the shingle Jaccard."""
    return float(np.mean(sig_a == sig_b))


class NearDuplicateIndex:
    """LSH index over the signatures of kept documents.

    :meth:`check_and_add` returns the number of the earlier document a signature duplicates, or
    None after adding it under a new number. Documents are numbered 0, 1, ... in the order added.
    """

    def __init__(self, config: DedupConfig):
        self.config = config
        self.rows = config.num_perm // config.bands
        self._buckets: List[Dict[bytes, List[int]]] = [{} for _ in range(config.bands)]
        self._signatures: List[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._signatures)

    def _band_keys(self, sig: np.ndarray) -> List[bytes]:
        return [sig[b * self.rows:(b + 1) * self.rows].tobytes() for b in range(self.config.bands)]

    def check_and_add(self, sig: np.ndarray) -> Optional[int]:
        if sig.shape != (self.config.num_perm,):
            raise ValueError(f"signature of shape {sig.shape}, expected ({self.config.num_perm},)")
        keys = self._band_keys(sig)
        compared = set()
        for band, key in enumerate(keys):
            for other in self._buckets[band].get(key, ()):
                if other in compared:
                    continue
                compared.add(other)
                if estimated_jaccard(sig, self._signatures[other]) >= self.config.threshold:
                    return other
        number = len(self._signatures)
        self._signatures.append(sig)
        for band, key in enumerate(keys):
            self._buckets[band].setdefault(key, []).append(number)
        return None
