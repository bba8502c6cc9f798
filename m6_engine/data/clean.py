"""``python -m m6_engine.data.clean``: stream JSON-lines documents through the cleaning rules.

Usage::

    python -m m6_engine.data.clean --input raw.jsonl [more.jsonl ...] --output cleaned.jsonl \\
        [--workers 2] [--word-list words.txt] [--no-exact-dedup] [--no-near-dedup] \\
        [--perplexity-scorer MODULE:FACTORY [--perplexity-scorer-arg ARG] --perplexity-drop-fraction 0.1] \\
        [--report report.json]

How it runs (:func:`clean_files`):

1. The parent reads the inputs as bytes, line by line, in chunks of ``chunk_lines`` lines.
2. A pool of ``workers`` processes cleans chunks: parsing, the per-document rules of
   :mod:`m6_engine.data.cleaning`, and the dedup fingerprints (exact key, MinHash signature; the
   costly part of dedup). At most ``2 * workers`` chunks are in flight, so memory stays bounded
   however large the input; results come back in input order, so the output does not depend on
   the number of workers.
3. Deduplication is a global pass in the parent: whether a document is a duplicate depends on
   every document before it, wherever it was cleaned, so one process must hold the table of
   keys (exact) and the LSH buckets (near). It keeps the first occurrence in input order. The
   parent only does dictionary look-ups there; the hashing already happened in the workers.
   Image-text pairs are deduplicated exactly on (image, text), never as near duplicates: their
   captions are short and templated, and the same words with another image are a new pair.
4. With a perplexity scorer, the parent scores each surviving document, writes them to a
   temporary file, then drops the worst fraction in a second pass (a fraction of the corpus needs
   every score). Output goes to a temporary name, renamed when complete.

A relative ``image`` path is relative to the JSON-lines file holding it; it is rewritten so that
it stays valid relative to the output file (and exact dedup of pairs compares these rewritten,
normalised paths, so one image file has one spelling whichever input names it). Progress (input
bytes) is a tqdm bar on stderr when it is a terminal (:mod:`m6_engine.progress`); the report (parse failures by reason, then per filter: seen,
dropped, changed, characters removed) is printed to stderr at the end and returned.
"""

import argparse
import collections
import importlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


from m6_engine.data.cleaning import (PARSE_REASONS, CleaningConfig, FilterStats, ParseError, PerplexityFilter,
                                     PerplexityScorer, build_filters, document_text, parse_line)
from m6_engine.data.dedup import DedupConfig, MinHasher, NearDuplicateIndex, exact_key
from m6_engine.data.streaming import atomic_file, ordered_map, read_line_chunks
from m6_engine.progress import progress_bar


@dataclass
class CleaningReport:
    """Counters of one cleaning run: input lines, per parse failure, per filter, documents kept."""

    lines: int = 0
    parse_errors: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in PARSE_REASONS})
    filters: Dict[str, FilterStats] = field(default_factory=dict)
    kept: int = 0

    def add_filter_stats(self, stats: Dict[str, FilterStats]) -> None:
        for name, s in stats.items():
            self.filters.setdefault(name, FilterStats()).add(s)

    def as_dict(self) -> dict:
        return {"lines": self.lines, "parse_errors": dict(self.parse_errors), "kept": self.kept,
                "filters": {n: vars(s) for n, s in self.filters.items()}}

    def format(self) -> str:
        rows = [f"{'lines read':<28}{self.lines:>10}"]
        rows += [f"{'  skipped ' + r:<28}{n:>10}" for r, n in self.parse_errors.items()]
        rows.append(f"{'filter':<28}{'seen':>10}{'dropped':>10}{'changed':>10}{'chars removed':>15}")
        rows += [f"{n:<28}{s.seen:>10}{s.dropped:>10}{s.changed:>10}{s.chars_removed:>15}"
                 for n, s in self.filters.items()]
        rows.append(f"{'documents kept':<28}{self.kept:>10}")
        return "\n".join(rows)


@dataclass
class _Cleaned:
    """A document that passed the per-document rules, with its dedup fingerprints."""

    doc: dict
    exact: Optional[bytes]
    signature: Optional[object]  # np.ndarray (num_perm,) uint32, None for image-text pairs


def _rebase_image(doc: dict, src_dir: Path, out_dir: Path) -> dict:
    """Make a relative ``image`` path relative to ``out_dir`` instead of ``src_dir`` (normalised)."""
    image = doc.get("image")
    if image is None or os.path.isabs(image):
        return doc
    rebased = os.path.relpath(os.path.normpath(src_dir / image), out_dir)
    return doc if rebased == image else {**doc, "image": rebased}


class _ChunkCleaner:
    """Worker-side job: raw lines -> cleaned documents + counters. Picklable (sent with each chunk)."""

    def __init__(self, config: CleaningConfig, dedup: DedupConfig, src_dirs: Sequence[Path], out_dir: Path):
        self.config, self.dedup = config, dedup
        self.src_dirs, self.out_dir = list(src_dirs), out_dir
        self.chain = build_filters(config)
        self.hasher = MinHasher(dedup) if dedup.near else None

    def __call__(self, chunk: Tuple[int, List[bytes]]):
        source, lines = chunk
        parse_errors = collections.Counter()
        stats = self.chain.new_stats()
        out: List[_Cleaned] = []
        for raw in lines:
            try:
                doc = parse_line(raw, self.config.text_fields)
            except ParseError as e:
                parse_errors[e.reason] += 1
                continue
            doc = self.chain(doc, stats)
            if doc is None:
                continue
            doc = _rebase_image(doc, self.src_dirs[source], self.out_dir)
            text = document_text(doc, self.config.text_fields)
            image = doc.get("image")  # after rebasing: one image file, one spelling, whatever the input
            key = exact_key(text if image is None else f"{image}\x00{text}") if self.dedup.exact else None
            sig = self.hasher.signature(text) if self.hasher is not None and image is None else None
            out.append(_Cleaned(doc, key, sig))
        return len(lines), sum(map(len, lines)), parse_errors, stats, out


class _Deduplicator:
    """The global pass: exact keys seen so far and the LSH index of kept documents."""

    def __init__(self, dedup: DedupConfig, text_fields: Sequence[str], report: CleaningReport):
        self.text_fields = tuple(text_fields)
        self.keys = set()
        self.near = NearDuplicateIndex(dedup) if dedup.near else None
        self.exact_stats = report.filters.setdefault("exact_dedup", FilterStats()) if dedup.exact else None
        self.near_stats = report.filters.setdefault("near_dedup", FilterStats()) if dedup.near else None

    def _drop(self, stats: FilterStats, item: _Cleaned) -> bool:
        stats.dropped += 1
        stats.chars_removed += sum(len(item.doc[f]) for f in self.text_fields if f in item.doc)
        return False

    def keep(self, item: _Cleaned) -> bool:
        if self.exact_stats is not None:
            self.exact_stats.seen += 1
            if item.exact in self.keys:
                return self._drop(self.exact_stats, item)
            self.keys.add(item.exact)
        if self.near is not None and item.signature is not None:
            self.near_stats.seen += 1
            if self.near.check_and_add(item.signature) is not None:
                return self._drop(self.near_stats, item)
        return True


def clean_files(inputs: Sequence[os.PathLike], output: os.PathLike, config: CleaningConfig = CleaningConfig(),
                dedup: DedupConfig = DedupConfig(), workers: int = 1, chunk_lines: int = 1000,
                perplexity: Optional[PerplexityFilter] = None, progress: bool = True) -> CleaningReport:
    """Clean JSON-lines ``inputs`` into ``output`` (see the module docstring); returns the report."""
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if workers < 1 or chunk_lines < 1:
        raise ValueError(f"workers and chunk_lines must be >= 1, got {workers} and {chunk_lines}")
    output = Path(output)
    out_dir = output.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    report = CleaningReport()
    cleaner = _ChunkCleaner(config, dedup, [p.resolve().parent for p in inputs], out_dir)
    report.add_filter_stats(cleaner.chain.new_stats())  # fixes the report's filter order
    deduper = _Deduplicator(dedup, config.text_fields, report)
    with atomic_file(output) as out, progress_bar(total=sum(p.stat().st_size for p in inputs), unit="B",
                                                  unit_scale=True, enabled=progress, desc="clean") as bar:
        # With a perplexity filter every survivor is scored and staged in a scratch file first.
        staged = tempfile.TemporaryFile(dir=out_dir) if perplexity is not None else out
        scores: List[float] = []
        results = ordered_map(cleaner, read_line_chunks(inputs, chunk_lines), workers)
        for n_lines, n_bytes, errors, stats, cleaned in results:
            report.lines += n_lines
            report.parse_errors.update({r: report.parse_errors[r] + n for r, n in errors.items()})
            report.add_filter_stats(stats)
            for item in cleaned:
                if deduper.keep(item):
                    if perplexity is not None:
                        scores.append(perplexity.score(document_text(item.doc, config.text_fields)))
                    staged.write(json.dumps(item.doc, ensure_ascii=False).encode("utf-8") + b"\n")
                    report.kept += 1
            bar.update(n_bytes)
        if perplexity is not None:
            with staged:
                _drop_worst(staged, out, perplexity, scores, report)
    if progress:
        print(report.format(), file=sys.stderr)
    return report


def _drop_worst(staged, out, perplexity: PerplexityFilter, scores: List[float], report: CleaningReport) -> None:
    """Second pass: copy the staged lines to ``out`` without the worst-perplexity documents."""
    drop = perplexity.dropped(scores)
    staged.seek(0)
    for line, dropped in zip(staged, drop):
        if not dropped:
            out.write(line)
    report.filters[perplexity.name] = perplexity.stats
    report.kept -= int(drop.sum())


def load_scorer(spec: str, arg: Optional[str]) -> PerplexityScorer:
    """``MODULE:FACTORY`` -> ``FACTORY(arg)`` (or ``FACTORY()``), which must return a text -> float callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--perplexity-scorer must look like MODULE:FACTORY, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no {attr!r}")
    scorer = factory(arg) if arg is not None else factory()
    if not callable(scorer):
        raise ValueError(f"{spec}() returned a {type(scorer).__name__}, not a text -> perplexity callable")
    return scorer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSON-lines files")
    p.add_argument("--output", required=True, help="cleaned JSON-lines file")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-lines", type=int, default=1000)
    p.add_argument("--min-title-chars", type=int, default=CleaningConfig.min_title_chars)
    p.add_argument("--min-content-chars", type=int, default=CleaningConfig.min_content_chars)
    p.add_argument("--word-list", default=None)
    p.add_argument("--no-exact-dedup", action="store_true")
    p.add_argument("--no-near-dedup", action="store_true")
    p.add_argument("--near-dup-threshold", type=float, default=DedupConfig.threshold)
    p.add_argument("--seed", type=int, default=0, help="seed of the MinHash functions")
    p.add_argument("--perplexity-scorer", default=None, help="MODULE:FACTORY returning text -> perplexity")
    p.add_argument("--perplexity-scorer-arg", default=None, help="argument of the factory (e.g. a checkpoint)")
    p.add_argument("--perplexity-drop-fraction", type=float, default=0.1)
    p.add_argument("--report", default=None, help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    config = CleaningConfig(min_title_chars=a.min_title_chars, min_content_chars=a.min_content_chars,
                            word_list=a.word_list)
    dedup = DedupConfig(exact=not a.no_exact_dedup, near=not a.no_near_dedup, threshold=a.near_dup_threshold,
                        seed=a.seed)
    perplexity = (PerplexityFilter(load_scorer(a.perplexity_scorer, a.perplexity_scorer_arg),
                                   a.perplexity_drop_fraction) if a.perplexity_scorer else None)
    report = clean_files(a.input, a.output, config, dedup, a.workers, a.chunk_lines, perplexity,
                         progress=not a.no_progress)
    if a.report:
        Path(a.report).write_text(json.dumps(report.as_dict(), indent=2))
    if a.no_progress:
        print(report.format(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
