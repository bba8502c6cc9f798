"""Worker side of preprocess: raw JSON-lines chunks -> token ids per document; tokenizer fingerprints.

Kept free of torch (and of anything importing it) on purpose: where the pool cannot fork its
workers are spawned and import this module afresh, and torch would add seconds to each start;
forked workers must not touch torch's thread pools either (:func:`m6_engine.data.streaming.ordered_map`).
"""

import collections
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from m6_engine.data.cleaning import ParseError, document_text, parse_line
from m6_engine.data.tokenizer import BertWordPieceTokenizer


@functools.lru_cache(maxsize=4)
def cached_tokenizer(vocab_file: str, lower_case: bool) -> BertWordPieceTokenizer:
    """One tokenizer per (vocab, case) per process, so its word cache warms once, not once per chunk."""
    return BertWordPieceTokenizer(vocab_file, lower_case=lower_case)


def tokenizer_fingerprint(tokenizer: BertWordPieceTokenizer) -> bytes:
    """16-byte BLAKE2b of the vocab entries in id order and the casing: equal iff two tokenizers map
    every text to the same ids. Token datasets record it; readers compare it to their tokenizer's."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"lower_case={bool(tokenizer.lower_case)}\n".encode())
    digest.update("\n".join(tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)).encode("utf-8"))
    return digest.digest()


def resolve_image(image: str, src_dir: str) -> str:
    """Absolute path of an ``image`` field, relative paths taken from the JSON-lines file's folder."""
    return str((Path(src_dir) / image).resolve())


@dataclass(frozen=True)
class ChunkTokenizer:
    """``(input index, raw lines)`` -> :class:`TokenizedChunk`.

    A document's text is its ``text_fields`` joined by a newline (:func:`document_text`); ids are
    stored as ``dtype``. Lines that are not documents are counted under the parser's reasons,
    documents without a single token under ``empty_tokens``.
    """

    vocab_file: str
    lower_case: bool
    text_fields: Tuple[str, ...]
    src_dirs: Tuple[str, ...]
    dtype: str

    def __call__(self, chunk: Tuple[int, List[bytes]]) -> "TokenizedChunk":
        source, lines = chunk
        tok = cached_tokenizer(self.vocab_file, self.lower_case)
        skipped = collections.Counter()
        ids: List[int] = []
        sizes: List[int] = []
        images: List[Optional[str]] = []
        for raw in lines:
            try:
                doc = parse_line(raw, self.text_fields)
            except ParseError as e:
                skipped[e.reason] += 1
                continue
            doc_ids = tok.encode(document_text(doc, self.text_fields))
            if not doc_ids:
                skipped["empty_tokens"] += 1
                continue
            ids.extend(doc_ids)
            sizes.append(len(doc_ids))
            image = doc.get("image")
            images.append(None if image is None else resolve_image(image, self.src_dirs[source]))
        # One flat array per chunk: pickling it back to the parent costs one buffer, not one per document.
        return TokenizedChunk(len(lines), sum(map(len, lines)), skipped, np.asarray(ids, dtype=self.dtype),
                              sizes, images)


@dataclass
class TokenizedChunk:
    """Documents of one chunk: their ids back to back, each one's size and (resolved) image path."""

    lines: int
    nbytes: int
    skipped: Dict[str, int]
    ids: np.ndarray
    sizes: List[int]
    images: List[Optional[str]]
