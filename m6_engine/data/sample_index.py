"""The sample index of a corpus: which documents each source of the training dataset draws from,
computed once, offline, and memory-mapped by every rank.

The training dataset (:mod:`m6_engine.data.dataset`) draws from three sources: ``text`` (documents
without an image), ``captions`` (image documents without the answer marker) and ``pairs`` (every
image document). Sorting image documents into captions and question-answer texts means reading
each one; done by every rank when its dataset opens, that is ~38 minutes per rank at the paper's
scale and a per-rank copy of every list. ``python -m m6_engine.data.preprocess --index PREFIX``
(and preprocess itself, at the end of a run or a merge) writes the lists once beside the corpus,
as ``<prefix>_samples.idx``; a dataset that finds one maps it read-only and opens in O(1) time and
memory, whatever the corpus size.

``<prefix>_samples.idx`` (little-endian)::

    magic         8 bytes   b"M6SMPIX\\x00"
    version       u32       FORMAT_VERSION
    marker_len    u32       tokens of the answer marker the captions were sorted by (0: none)
    text_count    u64       documents of <prefix>_text ...
    text_digest   16 bytes  ... and the BLAKE2b of its .bin: the index belongs to that data
    image_count   u64       images of <prefix>_image ...
    image_digest  16 bytes  ... and the BLAKE2b of its .bin
    patch_rows    i64       patches of every image (-1: not all the same; 0: no images)
    max_image_id  i64       largest image row a document names (-1: none)
    n_text, n_captions, n_pairs   3 x u64
    marker        int64[16] the marker's token ids (zero padded)
    text          int64[n_text]       document numbers, ascending
    captions      int64[n_captions]
    pairs         int64[n_pairs]

Building reads the whole token dataset (its offsets checked, as a full open does) and finds the
marker with vectorised comparisons over the token stream, only in the stretches that hold image
documents; :func:`scan_sources` is the plain per-document reference it is tested against. The
file is written under a temporary name and renamed into place, so a half-written index never
exists under the final name. Opening checks that the index describes this corpus (counts and
digests of both datasets, the marker); a stale one is not used.
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from m6_engine.data import indexed
from m6_engine.data.streaming import atomic_file
from m6_engine.progress import progress_bar

MAGIC = b"M6SMPIX\x00"
FORMAT_VERSION = 1
MAX_MARKER_TOKENS = 16
SOURCES = ("text", "captions", "pairs")
# magic version marker_len text_count text_digest image_count image_digest patch_rows max_image_id n[3] marker[16]
_HEADER = struct.Struct(f"<8sIIQ16sQ16sqq3Q{MAX_MARKER_TOKENS}q")
_SCAN_CHUNK = 1 << 24  # tokens compared at once when looking for the marker (~100 MB of temporaries)


class SampleIndexError(ValueError):
    """A sample index cannot be built or read: the message names the file and what is wrong."""


def sample_index_path(corpus) -> Path:
    """``<corpus>_samples.idx``."""
    return Path(f"{corpus}_samples.idx")


def find_marker(ids: np.ndarray, marker: np.ndarray) -> int:
    """Index of the first occurrence of ``marker`` in ``ids``, or -1."""
    m = len(marker)
    if m == 0 or len(ids) < m:
        return -1
    for i in np.flatnonzero(ids[:len(ids) - m + 1] == marker[0]).tolist():
        if np.array_equal(ids[i:i + m], marker):
            return i
    return -1


@dataclass(frozen=True)
class SourceDocuments:
    """The document numbers of each source, ascending (int64 arrays; mapped when read from a file)."""

    text: np.ndarray
    captions: np.ndarray
    pairs: np.ndarray

    def __getitem__(self, source: str) -> np.ndarray:
        return getattr(self, source)


def scan_sources(texts: indexed.IndexedDataset, marker: np.ndarray) -> SourceDocuments:
    """The plain reference: every image document read and searched for ``marker`` one by one."""
    image_ids = np.asarray(texts.image_ids)
    paired = np.flatnonzero(image_ids >= 0)
    captions = (paired if not len(marker) else
                np.asarray([d for d in paired.tolist() if find_marker(texts[d], marker) < 0], dtype=np.int64))
    return SourceDocuments(np.flatnonzero(image_ids < 0), captions, paired)


def _chunks_with(starts: np.ndarray, ends: np.ndarray, num_chunks: int) -> np.ndarray:
    """Chunks (of ``_SCAN_CHUNK`` tokens) overlapping any of the token ranges [starts, ends)."""
    live = ends > starts
    first, last = starts[live] // _SCAN_CHUNK, (ends[live] - 1) // _SCAN_CHUNK
    depth = np.cumsum(np.bincount(first, minlength=num_chunks + 1)
                      - np.bincount(last + 1, minlength=num_chunks + 1))
    return np.flatnonzero(depth[:num_chunks] > 0)


def marker_documents(texts: indexed.IndexedDataset, marker: np.ndarray, progress: bool = False) -> np.ndarray:
    """Image documents of ``texts`` that contain ``marker`` (ascending), found by vectorised
    comparison over the token stream in chunks, skipping chunks without image documents."""
    m, flat = len(marker), texts.flat
    paired = np.flatnonzero(np.asarray(texts.image_ids) >= 0)
    if not m or not len(paired):
        return np.zeros(0, dtype=np.int64)
    offsets, sizes = np.asarray(texts.offsets), np.asarray(texts.sizes).astype(np.int64)
    starts = offsets[paired]
    chunks = _chunks_with(starts, starts + sizes[paired], -(-len(flat) // _SCAN_CHUNK))
    found = []
    for c in progress_bar(chunks.tolist(), desc="sample index", unit="chunk", enabled=progress):
        begin, end = c * _SCAN_CHUNK, min((c + 1) * _SCAN_CHUNK, len(flat))
        window = np.asarray(flat[begin:min(end + m - 1, len(flat))])
        span = len(window) - m + 1
        if span <= 0:
            continue
        hit = window[:span] == marker[0]
        for j in range(1, m):
            hit &= window[j:j + span] == marker[j]
        at = begin + np.flatnonzero(hit)
        at = at[at < end]
        doc = np.searchsorted(offsets, at, side="right") - 1  # zero-size documents never contain one
        found.append(doc[at + m <= offsets[doc] + sizes[doc]])
    with_marker = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return with_marker[np.asarray(texts.image_ids)[with_marker] >= 0]


def build_sources(texts: indexed.IndexedDataset, marker: np.ndarray, progress: bool = False) -> SourceDocuments:
    """:func:`scan_sources`' result, computed with :func:`marker_documents` (the fast path)."""
    image_ids = np.asarray(texts.image_ids)
    paired = np.flatnonzero(image_ids >= 0)
    captions = paired[~np.isin(paired, marker_documents(texts, marker, progress), assume_unique=True)]
    return SourceDocuments(np.flatnonzero(image_ids < 0), captions, paired)


def _marker_words(marker: Sequence[int], where: str) -> np.ndarray:
    marker = np.asarray(marker, dtype=np.int64).reshape(-1)
    if len(marker) > MAX_MARKER_TOKENS:
        raise SampleIndexError(f"{where}: the answer marker has {len(marker)} tokens; a sample index holds "
                               f"at most {MAX_MARKER_TOKENS}")
    return marker


def build_sample_index(corpus, marker: Sequence[int], progress: bool = True) -> Path:
    """Write ``<corpus>_samples.idx`` for the answer marker's token ids ``marker`` (module doc)."""
    from m6_engine.data.preprocess import image_prefix, text_prefix

    path = sample_index_path(corpus)
    marker = _marker_words(marker, str(path))
    texts = indexed.open_tokens(text_prefix(corpus))
    images = indexed.open_patches(image_prefix(corpus))
    sources = build_sources(texts, marker, progress)
    image_ids = np.asarray(texts.image_ids)
    max_image = int(image_ids.max()) if len(image_ids) else -1
    if max_image >= len(images):
        raise SampleIndexError(f"{indexed.index_path(text_prefix(corpus))} pairs a document with image row "
                               f"{max_image}, but {image_prefix(corpus)} has {len(images)}")
    sizes = np.asarray(images.sizes)
    patch_rows = 0 if not len(sizes) else int(sizes[0]) if (sizes == sizes[0]).all() else -1
    padded = np.zeros(MAX_MARKER_TOKENS, dtype=np.int64)
    padded[:len(marker)] = marker
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(marker), len(texts), texts.header.bin_digest, len(images),
                          images.header.bin_digest, patch_rows, max_image,
                          *(len(sources[s]) for s in SOURCES), *padded.tolist())
    with atomic_file(path) as f:
        f.write(header)
        for source in SOURCES:
            f.write(np.ascontiguousarray(sources[source], dtype="<i8").tobytes())
    return path


@dataclass(frozen=True)
class SampleIndex:
    """An opened ``<corpus>_samples.idx``: its header fields and the mapped source lists."""

    path: Path
    marker: np.ndarray
    text_count: int
    text_digest: bytes
    image_count: int
    image_digest: bytes
    patch_rows: int
    max_image_id: int
    sources: SourceDocuments

    def mismatch(self, texts: indexed.IndexedDataset, images: indexed.IndexedDataset,
                 marker: np.ndarray) -> Optional[str]:
        """Why this index does not describe ``texts`` + ``images`` sorted by ``marker``, or None."""
        if (self.text_count, self.text_digest) != (len(texts), texts.header.bin_digest):
            return f"it was built for another {texts.prefix} (rebuilt or replaced since)"
        if (self.image_count, self.image_digest) != (len(images), images.header.bin_digest):
            return f"it was built for another {images.prefix} (rebuilt or replaced since)"
        if not np.array_equal(self.marker, marker):
            return (f"it sorted captions by the answer-marker tokens {self.marker.tolist()}, the dataset "
                    f"uses {np.asarray(marker).tolist()}")
        return None


def open_sample_index(corpus) -> Optional[SampleIndex]:
    """The corpus's sample index, mapped (O(1)); None when there is none. A damaged file is an error."""
    path = sample_index_path(corpus)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size or raw[:len(MAGIC)] != MAGIC:
        raise SampleIndexError(f"{path} is not an m6-engine sample index (truncated, or no {MAGIC!r} magic): "
                               f"rebuild it with `python -m m6_engine.data.preprocess --index {corpus}`")
    (_, version, marker_len, text_count, text_digest, image_count, image_digest, patch_rows, max_image,
     *rest) = _HEADER.unpack(raw)
    counts, marker = rest[:3], np.asarray(rest[3:3 + marker_len], dtype=np.int64)
    if version != FORMAT_VERSION:
        raise SampleIndexError(f"{path} has format version {version}, this m6-engine reads {FORMAT_VERSION}: "
                               f"rebuild it with `python -m m6_engine.data.preprocess --index {corpus}`")
    expected = _HEADER.size + 8 * sum(counts)
    if path.stat().st_size != expected:
        raise SampleIndexError(f"{path} is {path.stat().st_size} bytes, its header needs {expected}: truncated "
                               f"or corrupt; rebuild it with `python -m m6_engine.data.preprocess --index {corpus}`")
    arrays, at = {}, _HEADER.size
    for source, n in zip(SOURCES, counts):
        arrays[source] = indexed.map_array(path, "<i8", at, n)
        at += 8 * n
    return SampleIndex(path, marker, text_count, text_digest, image_count, image_digest, patch_rows, max_image,
                       SourceDocuments(**arrays))
