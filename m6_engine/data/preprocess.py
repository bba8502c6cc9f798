"""``python -m m6_engine.data.preprocess``: cleaned JSON-lines -> token and patch-feature datasets.

Usage::

    python -m m6_engine.data.preprocess --input cleaned.jsonl [more.jsonl ...] --output-prefix data/corpus \\
        [--vocab vocab.txt] [--workers 2] [--extractor resnet50 (--weights W | --random-weights) | --extractor pixels | pixels_edges]
    python -m m6_engine.data.preprocess --merge data/shard0 data/shard1 --output-prefix data/corpus
    python -m m6_engine.data.preprocess --index data/corpus [more prefixes] [--vocab vocab.txt] [--answer-marker 答：]

Writes two indexed datasets (:mod:`m6_engine.data.indexed`):

* ``<prefix>_text``: one token sequence per document: its text fields (``title``, ``content``)
  joined by a newline and WordPiece-encoded (no [CLS]/[SEP]; the task builders add them). The
  header holds the vocab size. ``image_ids[i]`` is the row of document i's image in
  ``<prefix>_image``, or -1 for a text-only document.
* ``<prefix>_image``: one (16, 2048) fp16 item per distinct image (documents sharing an image
  file, e.g. a caption and questions about it, share its row). Always written, possibly empty.

then ``<prefix>_samples.idx``, the corpus's sample index: the documents of each source of the
training dataset, found once here instead of by every rank at start-up
(:mod:`m6_engine.data.sample_index`; ``--answer-marker`` must be the training config's
``answer_marker``, default "答："), and ``<prefix>_meta.json``, written last: the tokenizer (vocab file, size, fingerprint, casing),
the extractor (name, weights file or ``random_weights: true``, seed) and the run's report, so a
corpus says how it was made. The token index itself records the vocab size and fingerprint,
which the training dataset checks against its tokenizer.

Steps (:func:`preprocess`): (1) collect the distinct image paths of the inputs (relative paths are
relative to the JSON-lines file); (2) extract their features: ``workers`` processes decode and cut
the images, the extractor runs in the parent process, where torch uses all its threads
(:mod:`m6_engine.data.vision`); a document whose image is rejected (under
5000 pixels, unreadable) is skipped and counted; (3) tokenise in a pool of ``workers`` processes
over chunks of lines, at most ``2 * workers`` chunks in flight, results written in input order
(the output does not depend on the number of workers). Lines that are not valid documents are
counted and skipped (the cleaning parser). Progress bars go to stderr.

``--merge`` concatenates finished corpora (``<p>_text`` + ``<p>_image`` pairs), shifting each
shard's image ids by the images of the shards before it, and indexes the result when the tokenizer
(``--vocab``, ``--cased``) is the one the shards were tokenised with. ``--index`` (re)builds the
sample index of finished corpora: for a corpus made before sample indexes existed, or after a
change of answer marker.
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from m6_engine.data import indexed, sample_index
from m6_engine.data.cleaning import PARSE_REASONS, TEXT_FIELDS, ParseError, parse_line
from m6_engine.data.doc_tokens import (ChunkTokenizer, TokenizedChunk, cached_tokenizer, resolve_image,
                                       tokenizer_fingerprint)
from m6_engine.data.streaming import atomic_file, ordered_map, read_line_chunks
from m6_engine.data.tokenizer import default_vocab_path
from m6_engine.data.vision import MIN_PIXELS, ExtractorConfig, build_extractor, write_patch_features
from m6_engine.progress import progress_bar


DEFAULT_ANSWER_MARKER = "答："
"""What ends the question of a question-answer document (``DatasetConfig.answer_marker``'s default)."""


def text_prefix(prefix) -> str:
    """``<prefix>_text``: the token dataset of a corpus."""
    return f"{prefix}_text"


def image_prefix(prefix) -> str:
    """``<prefix>_image``: the patch-feature dataset of a corpus."""
    return f"{prefix}_image"


def meta_path(prefix) -> Path:
    """``<prefix>_meta.json``: how a corpus was made."""
    return Path(f"{prefix}_meta.json")


def _retire(prefix) -> None:
    """Remove a previous corpus's index files (the marks of finished datasets) and metadata.

    A corpus is two datasets written one after the other; without this, a run interrupted
    between them would leave a new ``_image`` beside an old ``_text`` whose image rows point
    at other pictures. Each dataset alone is already atomic (indexed.py).
    """
    for path in (meta_path(prefix), sample_index.sample_index_path(prefix), indexed.index_path(text_prefix(prefix)),
                 indexed.index_path(image_prefix(prefix))):
        path.unlink(missing_ok=True)


def _write_meta(prefix, meta: dict) -> None:
    with atomic_file(meta_path(prefix), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)


@dataclass(frozen=True)
class PreprocessConfig:
    """How preprocess reads, tokenises and extracts."""

    vocab_file: str
    """BERT vocab.txt of the tokenizer."""
    lower_case: bool = True
    """Tokenizer lower-cases and strips accents (bert-base-chinese: yes)."""
    text_fields: Tuple[str, ...] = TEXT_FIELDS
    """Fields joined (by a newline) into a document's text; the last one is required."""
    workers: int = 1
    """Tokenising processes."""
    chunk_lines: int = 1000
    """Lines per tokenising task."""
    extractor: ExtractorConfig = ExtractorConfig()
    """Patch-feature extractor (built only when some document has an image)."""
    image_batch_size: int = 8
    """Images per extractor call."""
    min_pixels: int = MIN_PIXELS
    """Smaller images are dropped (with their documents)."""
    answer_marker: str = DEFAULT_ANSWER_MARKER
    """The training dataset's ``answer_marker``: the sample index sorts captions by it."""


@dataclass
class PreprocessReport:
    """Counts and throughput of one preprocess run."""

    lines: int = 0
    documents: int = 0
    tokens: int = 0
    paired_documents: int = 0
    skipped: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in PARSE_REASONS + ("empty_tokens",
                                                                                           "image_rejected")})
    images: dict = field(default_factory=dict)
    tokenize_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.tokenize_seconds if self.tokenize_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"lines": self.lines, "documents": self.documents, "tokens": self.tokens,
                "paired_documents": self.paired_documents, "skipped": dict(self.skipped), "images": self.images,
                "tokenize_seconds": round(self.tokenize_seconds, 3),
                "tokens_per_second": round(self.tokens_per_second, 1)}


def _image_paths(inputs: Sequence[Path], text_fields: Sequence[str]) -> List[str]:
    """Distinct resolved image paths of the inputs, in order of first appearance."""
    seen: Dict[str, None] = {}
    for path in inputs:
        src_dir = str(path.resolve().parent)
        with open(path, "rb") as f:
            for raw in f:
                if b'"image"' not in raw:  # cheap pre-check: most text-only lines are never parsed
                    continue
                try:
                    image = parse_line(raw, text_fields).get("image")
                except ParseError:
                    continue  # counted by the tokenising pass
                if image is not None:
                    seen.setdefault(resolve_image(image, src_dir), None)
    return list(seen)


def _add_chunk(builder: indexed.IndexedDatasetBuilder, chunk: TokenizedChunk, row_of: Dict[str, int],
               report: PreprocessReport) -> None:
    """Write a chunk's documents, pairing each with its image row; skip those whose image was rejected."""
    rows = [-1 if image is None else row_of[image] for image in chunk.images]
    keep = [image is None or row >= 0 for image, row in zip(chunk.images, rows)]
    ids, sizes = chunk.ids, chunk.sizes
    if not all(keep):
        pieces = np.split(ids, np.cumsum(sizes)[:-1])
        ids = np.concatenate([p for p, k in zip(pieces, keep) if k] or [ids[:0]])
        sizes = [n for n, k in zip(sizes, keep) if k]
        rows = [r for r, k in zip(rows, keep) if k]
        report.skipped["image_rejected"] += keep.count(False)
    builder.add_batch(ids, sizes, rows)
    report.documents += len(sizes)
    report.tokens += int(ids.size)
    report.paired_documents += sum(r >= 0 for r in rows)


def preprocess(inputs: Sequence, output_prefix, config: PreprocessConfig, progress: bool = True) -> PreprocessReport:
    """Build ``<output_prefix>_text`` and ``<output_prefix>_image`` from JSON-lines ``inputs`` (module docstring)."""
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if config.workers < 1 or config.chunk_lines < 1:
        raise ValueError(f"workers and chunk_lines must be >= 1, got {config.workers} and {config.chunk_lines}")
    tokenizer = cached_tokenizer(str(config.vocab_file), config.lower_case)  # fails early on a bad vocab
    vocab_size, vocab_hash = tokenizer.vocab_size, tokenizer_fingerprint(tokenizer)
    report = PreprocessReport()
    _retire(output_prefix)
    paths = _image_paths(inputs, config.text_fields)
    extractor = build_extractor(config.extractor) if paths else None  # text-only corpora need no weights
    rows, image_stats = write_patch_features(paths, image_prefix(output_prefix), extractor,
                                             config.image_batch_size, config.min_pixels, progress, config.workers)
    report.images = vars(image_stats)
    row_of = dict(zip(paths, rows))
    dtype = indexed.token_dtype(vocab_size)
    job = ChunkTokenizer(str(config.vocab_file), config.lower_case, tuple(config.text_fields),
                         tuple(str(p.resolve().parent) for p in inputs), dtype.str)
    start = time.perf_counter()
    with indexed.IndexedDatasetBuilder(text_prefix(output_prefix), "tokens", dtype, vocab_size=vocab_size,
                                       vocab_hash=vocab_hash) as builder, \
            progress_bar(total=sum(p.stat().st_size for p in inputs), unit="B", unit_scale=True,
                         enabled=progress, desc="tokenize") as bar:
        for chunk in ordered_map(job, read_line_chunks(inputs, config.chunk_lines), config.workers):
            report.lines += chunk.lines
            for reason, n in chunk.skipped.items():
                report.skipped[reason] += n
            _add_chunk(builder, chunk, row_of, report)
            bar.update(chunk.nbytes)
        builder.finalize()
    report.tokenize_seconds = time.perf_counter() - start
    index_corpus(output_prefix, tokenizer, config.answer_marker, progress)
    _write_meta(output_prefix, {
        "inputs": [str(p) for p in inputs],
        "tokenizer": {"vocab_file": str(config.vocab_file), "vocab_size": vocab_size,
                      "vocab_hash": vocab_hash.hex(), "lower_case": config.lower_case},
        "extractor": dataclasses.asdict(config.extractor) if paths else None,
        "report": report.as_dict()})
    return report


def index_corpus(prefix, tokenizer, answer_marker: str = DEFAULT_ANSWER_MARKER, progress: bool = True) -> Path:
    """Write the corpus's sample index, sorting captions by ``answer_marker`` as ``tokenizer``
    encodes it; the corpus must have been tokenised by ``tokenizer``."""
    texts = indexed.open_tokens(text_prefix(prefix), tokenizer.vocab_size, tokenizer_fingerprint(tokenizer))
    del texts  # opened for its checks: the corpus is whole and tokenised with this tokenizer
    return sample_index.build_sample_index(prefix, tokenizer.encode(answer_marker), progress)


def merge_corpora(output_prefix, prefixes: Sequence) -> Tuple[indexed.IndexedDataset, indexed.IndexedDataset]:
    """Merge corpora ``<p>_text`` + ``<p>_image`` into ``<output_prefix>_*``, keeping every pair
    aligned (:func:`index_corpus` writes the merged corpus's sample index)."""
    if not prefixes:
        raise ValueError("merge needs at least one corpus prefix")
    image_counts = [len(indexed.open_patches(image_prefix(p))) for p in prefixes]
    offsets = np.concatenate(([0], np.cumsum(image_counts)[:-1])).tolist()
    _retire(output_prefix)
    images = indexed.merge(image_prefix(output_prefix), [image_prefix(p) for p in prefixes])
    texts = indexed.merge(text_prefix(output_prefix), [text_prefix(p) for p in prefixes], offsets)
    _write_meta(output_prefix, {"merged_from": [str(p) for p in prefixes], "documents": len(texts),
                                "images": len(images), "vocab_size": texts.vocab_size,
                                "vocab_hash": texts.vocab_hash.hex()})
    return texts, images


def describe_sample_index(prefix) -> str:
    """One line about a corpus's sample index: the documents of each source."""
    index = sample_index.open_sample_index(prefix)
    if index is None:
        return "no sample index"
    return ", ".join(f"{len(index.sources[s])} {s}" for s in sample_index.SOURCES) + " documents"


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="cleaned JSON-lines files")
    src.add_argument("--merge", nargs="+", metavar="PREFIX", help="merge finished corpora instead")
    src.add_argument("--index", nargs="+", metavar="PREFIX", help="(re)build the sample index of finished corpora")
    p.add_argument("--output-prefix", help="what --input or --merge writes")
    p.add_argument("--answer-marker", default=DEFAULT_ANSWER_MARKER,
                   help="the training config's data answer_marker: the sample index sorts captions by it")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (default: the installed bert-base-chinese)")
    p.add_argument("--cased", action="store_true", help="do not lower-case (the default vocab is uncased)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-lines", type=int, default=1000)
    p.add_argument("--extractor", default=ExtractorConfig.name, help="patch extractor: resnet50 | pixels | pixels_edges")
    p.add_argument("--weights", default=None, help="resnet50 weights file (torchvision state dict)")
    p.add_argument("--random-weights", action="store_true", help="resnet50 with random weights (testing only)")
    p.add_argument("--image-batch-size", type=int, default=8)
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    p.add_argument("--device", default="cpu", help="torch device of the resnet50 extractor (e.g. cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for feature extraction")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _parse_args(argv)
    try:
        if a.index:
            tokenizer = cached_tokenizer(str(a.vocab or default_vocab_path()), not a.cased)
            for prefix in a.index:
                path = index_corpus(prefix, tokenizer, a.answer_marker, progress=not a.no_progress)
                print(f"{path}: {describe_sample_index(prefix)}")
            return 0
        if not a.output_prefix:
            raise ValueError("--output-prefix is required with --input and --merge")
        if a.merge:
            texts, images = merge_corpora(a.output_prefix, a.merge)
            print(f"merged {len(a.merge)} corpora: {len(texts)} documents, {len(images)} images")
            tokenizer = cached_tokenizer(str(a.vocab or default_vocab_path()), not a.cased)
            matches = (texts.vocab_size, texts.vocab_hash) == (tokenizer.vocab_size, tokenizer_fingerprint(tokenizer))
            if matches:
                index_corpus(a.output_prefix, tokenizer, a.answer_marker, progress=not a.no_progress)
            else:
                print(f"NOTE: the shards were tokenised with another vocab than {a.vocab or 'the default'}: no "
                      f"sample index written; run --index {a.output_prefix} --vocab THEIR_VOCAB", file=sys.stderr)
            return 0
        if a.threads:
            torch.set_num_threads(a.threads)
        config = PreprocessConfig(
            vocab_file=str(a.vocab or default_vocab_path()), lower_case=not a.cased, workers=a.workers,
            chunk_lines=a.chunk_lines, image_batch_size=a.image_batch_size, min_pixels=a.min_pixels,
            extractor=ExtractorConfig(a.extractor, a.weights, a.random_weights, a.seed, device=a.device),
            answer_marker=a.answer_marker)
        report = preprocess(a.input, a.output_prefix, config, progress=not a.no_progress)
    except (indexed.IndexFormatError, sample_index.SampleIndexError, FileNotFoundError, ValueError) as e:
        print(f"preprocess: {e}", file=sys.stderr)
        return 1
    r = report.as_dict()
    print(f"{r['documents']} documents ({r['paired_documents']} with an image), {r['tokens']} tokens, "
          f"{r['tokens_per_second']:.0f} tokens/s; images {r['images']}; skipped {r['skipped']}")
    if a.random_weights and r["images"].get("written"):
        print("NOTE: the patch features come from a RANDOMLY initialised ResNet-50 (--random-weights): "
              "they carry no image meaning", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
