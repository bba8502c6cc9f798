"""Memory-mapped indexed datasets: a ``.bin`` of items back to back and an ``.idx`` that finds them.

Two kinds share one format:

* **tokens**: item ``i`` is a 1-d sequence of token ids, ``uint16`` when the vocab fits (≤ 65536
  entries), else ``int32``; the header records the tokenizer's vocab size, so a reader can refuse
  data tokenised with another vocab. Each item also carries ``image_id``: the row of its image in
  the paired patch dataset, or -1 for a text-only document.
* **patches**: item ``i`` is one image's patch features, ``(num_patches, feature_dim)`` in fp16
  (16 × 2048 for M6).

An item has shape ``(size_i, *row_shape)``: ``row_shape`` is ``()`` for tokens and
``(feature_dim,)`` for patches (whose sizes are all ``num_patches``).

``.idx`` layout (little-endian)::

    magic      8 bytes   b"M6IDX\\x00\\x00\\x00"
    version    u32       FORMAT_VERSION
    kind       u32       1 = tokens, 2 = patches
    dtype      u32       1 = uint16, 2 = int32, 3 = float16
    row_ndim   u32       0 or 1
    row_shape  2 x u32   (unused entries 0)
    count      u64       number of items N
    bin_nbytes u64       exact size of the .bin (a truncated or overlong .bin is detected)
    vocab_size u64       tokens: the tokenizer's vocab size; patches: 0
    vocab_hash 16 bytes  tokens: fingerprint of the tokenizer (vocab entries + casing); zeros: unknown
    bin_digest 16 bytes  BLAKE2b-128 of the whole .bin, computed while writing (:meth:`IndexedDataset.verify`)
    sizes      int32[N]  first dim of each item
    (zero pad to 8 bytes)
    offsets    int64[N]  element offset of each item in the .bin
    image_ids  int64[N]  paired row in another dataset, -1 for none

Opening checks the header, the sizes of both files and that the offsets tile the .bin: O(N) in
the index, O(1) in the data. ``IndexedDataset(prefix, check_offsets=False)`` skips the tiling
check and opens in O(1) (the training dataset does, once a sample index built offline has checked
the whole index: :mod:`m6_engine.data.sample_index`); every item read is still bounds-checked
against the .bin. A ``.bin`` of the right size from another build (a mismatched pair) is caught by
:meth:`IndexedDataset.verify`, which re-hashes the data (``python -m m6_engine.data.indexed info
--verify``).

Random access is O(1) and copy-free: ``dataset[i]`` is a view into a copy-on-write ``np.memmap``
of the ``.bin`` (writing to it never reaches the file), and :meth:`IndexedDataset.tensor` wraps
that view with ``torch.from_numpy`` (no copy either).

Builders write to temporary names in the destination folder and rename them into place only when
complete (``.bin`` first, then ``.idx``, whose presence marks a finished dataset), so an interrupted
build never looks finished. Every open failure is a :class:`IndexFormatError` naming the file.
"""

import argparse
import hashlib
import os
import sys
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

PathLike = Union[str, Path]

MAGIC = b"M6IDX\x00\x00\x00"
FORMAT_VERSION = 1
KIND_TOKENS, KIND_PATCHES = 1, 2
KIND_NAMES = {KIND_TOKENS: "tokens", KIND_PATCHES: "patches"}
DTYPE_CODES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32), 3: np.dtype(np.float16)}
_CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}
_COPY_CHUNK = 16 * 2**20  # bytes per read when merging or verifying
# magic version kind dtype row_ndim row_shape[2] count bin_nbytes vocab_size vocab_hash bin_digest
_HEADER = struct.Struct("<8sIIIIIIQQQ16s16s")
NO_HASH = bytes(16)
"""``vocab_hash`` of a token dataset built without a tokenizer fingerprint (never compared)."""


class IndexFormatError(ValueError):
    """An index or data file is missing, truncated, foreign, of another version, or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype holding ids ``0 .. vocab_size - 1``: uint16 up to 65536 entries, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def index_path(prefix: PathLike) -> Path:
    """``<prefix>.idx``."""
    return Path(f"{prefix}.idx")


def data_path(prefix: PathLike) -> Path:
    """``<prefix>.bin``."""
    return Path(f"{prefix}.bin")


@dataclass(frozen=True)
class IndexHeader:
    """The fixed part of an ``.idx`` (see the module docstring)."""

    kind: int
    dtype: np.dtype
    row_shape: Tuple[int, ...]
    count: int
    bin_nbytes: int
    vocab_size: int
    vocab_hash: bytes
    bin_digest: bytes

    def pack(self) -> bytes:
        shape = list(self.row_shape) + [0] * (2 - len(self.row_shape))
        return _HEADER.pack(MAGIC, FORMAT_VERSION, self.kind, _CODE_OF_DTYPE[self.dtype], len(self.row_shape),
                            *shape, self.count, self.bin_nbytes, self.vocab_size, self.vocab_hash, self.bin_digest)

    @property
    def row_elems(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64))


def _arrays_layout(count: int) -> Tuple[int, int, int, int]:
    """Byte offsets in the .idx of sizes, offsets, image_ids, and the total .idx size."""
    sizes_at = _HEADER.size
    offsets_at = sizes_at + -(-4 * count // 8) * 8
    image_ids_at = offsets_at + 8 * count
    return sizes_at, offsets_at, image_ids_at, image_ids_at + 8 * count


def _parse_header(raw: bytes, path: Path) -> IndexHeader:
    if len(raw) < _HEADER.size:
        if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
            raise IndexFormatError(f"{path} is not an m6-engine index file (no {MAGIC!r} magic)")
        raise IndexFormatError(f"{path} is truncated: {len(raw)} bytes, shorter than the "
                               f"{_HEADER.size}-byte header")
    magic, version, kind, code, ndim, s0, s1, count, bin_nbytes, vocab, vocab_hash, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise IndexFormatError(f"{path} is not an m6-engine index file: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{path} has index format version {version}, this m6-engine reads version "
                               f"{FORMAT_VERSION}: rebuild it with this version's preprocess")
    if kind not in KIND_NAMES or code not in DTYPE_CODES or ndim > 2:
        raise IndexFormatError(f"{path} has a corrupt header (kind {kind}, dtype code {code}, row_ndim {ndim})")
    return IndexHeader(kind, DTYPE_CODES[code], (s0, s1)[:ndim], count, bin_nbytes, vocab, vocab_hash, digest)


def map_array(path: Path, dtype: str, offset: int, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` at byte ``offset`` of ``path``, mapped read-only (not read)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class IndexedDataset:
    """Read-only view of ``<prefix>.idx`` + ``<prefix>.bin``; validates both when opened.

    ``len(ds)``; ``ds[i]`` -> np.ndarray ``(sizes[i], *row_shape)``, a view of the mapped file;
    ``ds.tensor(i)`` -> the same memory as a torch tensor; ``sizes`` (N,) int32; ``image_ids``
    (N,) int64; ``kind``, ``dtype``, ``row_shape``, ``vocab_size``, ``vocab_hash`` from the header.
    """

    def __init__(self, prefix: PathLike, check_offsets: bool = True):
        self.prefix = str(prefix)
        idx, bin_ = index_path(prefix), data_path(prefix)
        for p in (idx, bin_):
            if not p.is_file():
                raise IndexFormatError(f"{p} does not exist (an indexed dataset is <prefix>.idx + <prefix>.bin)")
        with open(idx, "rb") as f:
            header = _parse_header(f.read(_HEADER.size), idx)
        sizes_at, offsets_at, image_ids_at, idx_nbytes = _arrays_layout(header.count)
        actual = idx.stat().st_size
        if actual != idx_nbytes:
            raise IndexFormatError(f"{idx} is {actual} bytes, its header ({header.count} items) needs "
                                   f"{idx_nbytes}: the file is truncated or corrupt")
        n = header.count
        # Mapped read-only, not read: a corpus of 10^8 documents has a 2 GB index.
        self.sizes = map_array(idx, "<i4", sizes_at, n)
        self.offsets = map_array(idx, "<i8", offsets_at, n)
        self.image_ids = map_array(idx, "<i8", image_ids_at, n)
        actual = bin_.stat().st_size
        if actual != header.bin_nbytes:
            raise IndexFormatError(f"{bin_} is {actual} bytes, its index {idx} records {header.bin_nbytes}: "
                                   f"the data file is truncated or does not belong to this index")
        self.header = header
        self._total = total = header.bin_nbytes // header.dtype.itemsize
        if check_offsets:
            self._check_offsets(idx)
        elif n and int(self.offsets[-1]) + int(self.sizes[-1]) * header.row_elems != total:
            raise IndexFormatError(f"{idx}: its last item does not end where {bin_} does: corrupt index")
        self._data = (np.memmap(bin_, dtype=header.dtype, mode="c", shape=(total,)) if total
                      else np.empty(0, dtype=header.dtype))

    def _check_offsets(self, idx: Path) -> None:
        h = self.header
        if h.bin_nbytes % (h.dtype.itemsize * max(h.row_elems, 1)):
            raise IndexFormatError(f"{idx}: .bin size {h.bin_nbytes} is not a whole number of rows")
        if (self.sizes < 0).any():
            raise IndexFormatError(f"{idx} has negative item sizes: corrupt index")
        elems = self.sizes.astype(np.int64) * h.row_elems
        expected = np.concatenate(([0], np.cumsum(elems)[:-1])) if len(elems) else elems
        if not np.array_equal(self.offsets, expected) or int(elems.sum()) * h.dtype.itemsize != h.bin_nbytes:
            raise IndexFormatError(f"{idx}: item offsets do not tile the .bin: corrupt index")

    @property
    def flat(self) -> np.ndarray:
        """Every item's elements back to back, as stored (the mapped .bin, 1-d)."""
        return self._data.reshape(-1)

    @property
    def kind(self) -> str:
        return KIND_NAMES[self.header.kind]

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def row_shape(self) -> Tuple[int, ...]:
        return self.header.row_shape

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    @property
    def vocab_hash(self) -> bytes:
        return self.header.vocab_hash

    def verify(self) -> None:
        """Re-hash the whole ``.bin`` against the digest its builder recorded (O(size of the data)).

        Catches what the cheap checks at open cannot: a ``.bin`` of the right size that belongs to
        another build, or bytes changed in place.
        """
        digest = hashlib.blake2b(digest_size=16)
        with open(data_path(self.prefix), "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
        if digest.digest() != self.header.bin_digest:
            raise IndexFormatError(f"{data_path(self.prefix)} does not match the digest recorded in "
                                   f"{index_path(self.prefix)}: the pair is mismatched or the data was modified")

    def __len__(self) -> int:
        return self.header.count

    def __getitem__(self, i: int) -> np.ndarray:
        n = self.header.count
        if not -n <= i < n:
            raise IndexError(f"item {i} is out of range for {self.prefix} ({n} items)")
        i %= n
        start = int(self.offsets[i])
        size = int(self.sizes[i])
        # O(1), and what keeps an index opened without check_offsets from reading past the data.
        if start < 0 or size < 0 or start + size * self.header.row_elems > self._total:
            raise IndexFormatError(f"{index_path(self.prefix)}: item {i} (offset {start}, size {size}) lies "
                                   f"outside {data_path(self.prefix)}: corrupt index")
        return self._data[start:start + size * self.header.row_elems].reshape((size, *self.row_shape))

    def tensor(self, i: int) -> torch.Tensor:
        """Item ``i`` as a tensor sharing the mapped memory (dtype as stored: uint16/int32/float16)."""
        return torch.from_numpy(self[i])


def open_tokens(prefix: PathLike, vocab_size: Optional[int] = None,
                vocab_hash: Optional[bytes] = None, check_offsets: bool = True) -> IndexedDataset:
    """Open a token dataset; with ``vocab_size`` / ``vocab_hash``, refuse data tokenised with another
    tokenizer. The hash is compared only when the dataset recorded one (builders given no
    fingerprint store :data:`NO_HASH`). ``check_offsets``: as for :class:`IndexedDataset`."""
    ds = IndexedDataset(prefix, check_offsets)
    if ds.kind != "tokens":
        raise IndexFormatError(f"{index_path(prefix)} holds {ds.kind}, expected tokens")
    if vocab_size is not None and ds.vocab_size != vocab_size:
        raise IndexFormatError(f"{index_path(prefix)} was tokenised with a vocab of {ds.vocab_size} entries, "
                               f"the tokenizer has {vocab_size}: re-run preprocess with this vocab")
    if vocab_hash is not None and ds.vocab_hash != NO_HASH and ds.vocab_hash != vocab_hash:
        raise IndexFormatError(f"{index_path(prefix)} was tokenised with another tokenizer of the same size "
                               f"(vocab fingerprint {ds.vocab_hash.hex()}, this tokenizer's {vocab_hash.hex()}: "
                               f"other entries or casing): re-run preprocess with this vocab")
    return ds


def open_patches(prefix: PathLike, num_patches: Optional[int] = None,
                 feature_dim: Optional[int] = None, check_offsets: bool = True) -> IndexedDataset:
    """Open a patch-feature dataset; optionally check its (num_patches, feature_dim): the patch
    count of every image is checked only with ``check_offsets`` (it reads the whole index)."""
    ds = IndexedDataset(prefix, check_offsets)
    if ds.kind != "patches":
        raise IndexFormatError(f"{index_path(prefix)} holds {ds.kind}, expected patches")
    if feature_dim is not None and ds.row_shape != (feature_dim,):
        raise IndexFormatError(f"{index_path(prefix)} has {ds.row_shape[0]}-d patch features, expected {feature_dim}")
    if check_offsets and num_patches is not None and len(ds) and (ds.sizes != num_patches).any():
        raise IndexFormatError(f"{index_path(prefix)} has images without exactly {num_patches} patches")
    return ds


class IndexedDatasetBuilder:
    """Streams items into ``<prefix>.bin`` / ``.idx`` under temporary names; :meth:`finalize` renames.

    Use as a context manager: leaving the block without :meth:`finalize` (an exception, a bug)
    deletes the temporary files, so no half-written dataset remains under the final names.
    """

    def __init__(self, prefix: PathLike, kind: str, dtype, row_shape: Sequence[int] = (), vocab_size: int = 0,
                 vocab_hash: bytes = NO_HASH):
        kinds = {name: code for code, name in KIND_NAMES.items()}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} is not storable; use one of {list(map(str, _CODE_OF_DTYPE))}")
        if kind == "tokens" and (tuple(row_shape) != () or vocab_size <= 0 or self.dtype.kind not in "iu"):
            raise ValueError("a token dataset has integer items, row_shape () and a positive vocab_size")
        if len(row_shape) > 2:
            raise ValueError(f"row_shape has at most 2 dims, got {tuple(row_shape)}")
        self.prefix, self.kind_code = str(prefix), kinds[kind]
        if len(vocab_hash) != 16:
            raise ValueError(f"vocab_hash must be 16 bytes, got {len(vocab_hash)}")
        self.row_shape, self.vocab_size, self.vocab_hash = tuple(int(d) for d in row_shape), int(vocab_size), vocab_hash
        self._digest = hashlib.blake2b(digest_size=16)
        self.sizes: List[int] = []
        self.image_ids: List[int] = []
        self._nbytes = 0
        folder = Path(self.prefix).parent
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(self.prefix).name
        fd, self._tmp_bin = tempfile.mkstemp(prefix=f".{name}.bin.", suffix=".tmp", dir=folder)
        self._bin = os.fdopen(fd, "wb")
        self._tmp_idx: Optional[str] = None
        self._done = False

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def __len__(self) -> int:
        return len(self.sizes)

    def add(self, item, image_id: int = -1) -> None:
        """Append one item (array-like of shape ``(size, *row_shape)``) and its paired image row."""
        arr = np.asarray(item)
        self.add_batch(arr, [arr.shape[0] if arr.ndim else -1], [image_id])

    def add_batch(self, rows, sizes: Sequence[int], image_ids: Sequence[int]) -> None:
        """Append ``len(sizes)`` items stored back to back in ``rows`` (``(sum(sizes), *row_shape)``).

        One write for many small items (the tokenised documents of a chunk).
        """
        arr = np.asarray(rows)
        if arr.ndim != 1 + len(self.row_shape) or arr.shape[1:] != self.row_shape:
            raise ValueError(f"item of shape {arr.shape} does not match row shape {self.row_shape}")
        sizes = [int(n) for n in sizes]
        if len(sizes) != len(image_ids) or min(sizes, default=0) < 0 or sum(sizes) != arr.shape[0]:
            raise ValueError(f"sizes {sizes[:8]}... do not split {arr.shape[0]} rows among {len(image_ids)} items")
        if self.kind_code == KIND_TOKENS and arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{arr.min()}, {arr.max()}]")
        self._write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.sizes.extend(sizes)
        self.image_ids.extend(int(i) for i in image_ids)

    def append_raw(self, other: IndexedDataset, image_offset: int = 0) -> None:
        """Append every item of ``other`` (same kind, dtype, row shape, vocab) by copying its .bin."""
        mine = (self.kind_code, self.dtype, self.row_shape, self.vocab_size, self.vocab_hash.hex())
        theirs = (other.header.kind, other.dtype, other.row_shape, other.vocab_size, other.vocab_hash.hex())
        if mine != theirs:
            raise IndexFormatError(f"cannot merge {index_path(other.prefix)} (kind, dtype, row shape, vocab, "
                                   f"vocab fingerprint {theirs}) into a dataset of {mine}")
        with open(data_path(other.prefix), "rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                self._write(chunk)
        self.sizes.extend(other.sizes.tolist())
        ids = other.image_ids
        self.image_ids.extend(np.where(ids >= 0, ids + image_offset, -1).tolist())

    def _write(self, data: bytes) -> None:
        self._bin.write(data)
        self._digest.update(data)
        self._nbytes += len(data)

    def finalize(self) -> None:
        """Write the index and rename both files into place (the .idx last)."""
        n = len(self.sizes)
        header = IndexHeader(self.kind_code, self.dtype, self.row_shape, n, self._nbytes, self.vocab_size,
                             self.vocab_hash, self._digest.digest())
        sizes_at, offsets_at, image_ids_at, idx_nbytes = _arrays_layout(n)
        sizes = np.asarray(self.sizes, dtype=np.int64)
        if n and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError("an item has more than 2**31 - 1 rows")
        offsets = np.concatenate(([0], np.cumsum(sizes * max(header.row_elems, 1))[:-1])) if n else sizes
        buf = bytearray(idx_nbytes)
        buf[:sizes_at] = header.pack()
        buf[sizes_at:sizes_at + 4 * n] = sizes.astype("<i4").tobytes()
        buf[offsets_at:image_ids_at] = offsets.astype("<i8").tobytes()
        buf[image_ids_at:] = np.asarray(self.image_ids, dtype="<i8").tobytes()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        folder, name = Path(self.prefix).parent, Path(self.prefix).name
        fd, self._tmp_idx = tempfile.mkstemp(prefix=f".{name}.idx.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(buf))
            f.flush()
            os.fsync(f.fileno())
        # Remove a previous .idx first: between the two renames no stale index may describe the new .bin.
        index_path(self.prefix).unlink(missing_ok=True)
        for tmp in (self._tmp_bin, self._tmp_idx):
            os.chmod(tmp, 0o644)
        os.replace(self._tmp_bin, data_path(self.prefix))
        os.replace(self._tmp_idx, index_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Delete the temporary files; the final names are left as they were."""
        self._bin.close()
        for tmp in (self._tmp_bin, self._tmp_idx):
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        self._done = True


def merge(out_prefix: PathLike, in_prefixes: Sequence[PathLike],
          image_offsets: Optional[Sequence[int]] = None) -> IndexedDataset:
    """Concatenate datasets of one kind/dtype/row shape/vocab into ``out_prefix``, in order.

    ``image_offsets[k]`` is added to the non-negative ``image_ids`` of input ``k`` (the number of
    images in the patch datasets merged before it), keeping text-image pairs aligned after a merge.
    """
    if not in_prefixes:
        raise ValueError("merge needs at least one input dataset")
    inputs = [IndexedDataset(p) for p in in_prefixes]
    offsets = list(image_offsets) if image_offsets is not None else [0] * len(inputs)
    if len(offsets) != len(inputs):
        raise ValueError(f"{len(offsets)} image offsets for {len(inputs)} datasets")
    first = inputs[0]
    kind = KIND_NAMES[first.header.kind]
    with IndexedDatasetBuilder(out_prefix, kind, first.dtype, first.row_shape, first.vocab_size,
                               first.vocab_hash) as builder:
        for ds, off in zip(inputs, offsets):
            builder.append_raw(ds, off)
        builder.finalize()
    return IndexedDataset(out_prefix)


def describe(prefix: PathLike) -> str:
    """One line about a dataset: kind, items, dtype, row shape, vocab, total rows."""
    ds = IndexedDataset(prefix)
    paired = int((ds.image_ids >= 0).sum())
    return (f"{prefix}: {ds.kind}, {len(ds)} items, dtype {ds.dtype}, row shape {ds.row_shape}, "
            f"vocab {ds.vocab_size}, {int(ds.sizes.sum())} rows, {paired} paired with an image")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Inspect or merge m6-engine indexed datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe datasets")
    info.add_argument("prefixes", nargs="+")
    info.add_argument("--verify", action="store_true", help="also re-hash each .bin against its recorded digest")
    mrg = sub.add_parser("merge", help="concatenate datasets (image ids are not shifted: see preprocess merge)")
    mrg.add_argument("--output-prefix", required=True)
    mrg.add_argument("prefixes", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            for p in args.prefixes:
                print(describe(p))
                if args.verify:
                    IndexedDataset(p).verify()
                    print(f"{p}: data matches its recorded digest")
        else:
            merge(args.output_prefix, args.prefixes)
            print(describe(args.output_prefix))
    except IndexFormatError as e:
        print(f"indexed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
