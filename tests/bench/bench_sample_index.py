"""Benchmark of the dataset's start-up at corpus scale (figures, not pass/fail): a synthetic corpus
of 10M documents, its sample index built once, then a rank opening the dataset with and without it.

* build: seconds of ``build_sample_index`` (the offline job ``preprocess --index`` runs), and of
  the per-document reference scan it replaces on the same corpus, in the same run;
* open: in a fresh process (a rank), the seconds from constructing ``PretrainDataset`` to its
  first micro-batch, and the resident memory that added: private (RssAnon, the rank's own) and
  mapped (RssFile: pages of the corpus files in the page cache, one copy for every rank of a
  node, reclaimable; the kernel maps ~1 MB of page cache around each random read), with the
  sample index (O(1): goal < 1 s and < 50 MB) and without it (the rank scans every image
  document, as every rank did before sample indexes).

The corpus: documents of 6 tokens; every 4th has an image (64 distinct), every 8th holds the
answer marker (a question-answer text), so a quarter are image documents and half of those
captions. Usage: ``python -m tests.bench.bench_sample_index [--quick] [--out DIR]``.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from m6_engine.data import indexed, preprocess, sample_index
from m6_engine.data.doc_tokens import tokenizer_fingerprint
from tests.bench.common import print_table, quick_main, write_json

DOC_TOKENS = 6
NUM_IMAGES = 64
_CHUNK_DOCS = 1 << 20


def _tokenizer():
    from m6_engine.data.tokenizer import BertWordPieceTokenizer, default_vocab_path

    return BertWordPieceTokenizer(default_vocab_path())


def write_corpus(prefix: Path, num_docs: int, tokenizer) -> None:
    """The synthetic corpus of the module docstring at ``prefix``."""
    marker = tokenizer.encode(preprocess.DEFAULT_ANSWER_MARKER)
    rng = np.random.default_rng(0)
    dtype = indexed.token_dtype(tokenizer.vocab_size)
    with indexed.IndexedDatasetBuilder(f"{prefix}_text", "tokens", dtype, vocab_size=tokenizer.vocab_size,
                                       vocab_hash=tokenizer_fingerprint(tokenizer)) as builder:
        for first in range(0, num_docs, _CHUNK_DOCS):
            docs = np.arange(first, min(first + _CHUNK_DOCS, num_docs))
            tokens = rng.integers(1000, 2000, size=(len(docs), DOC_TOKENS)).astype(dtype)
            questions = docs % 8 == 0
            tokens[questions, 2:2 + len(marker)] = marker
            images = np.where(docs % 4 == 0, (docs // 4) % NUM_IMAGES, -1)
            builder.add_batch(tokens.reshape(-1), [DOC_TOKENS] * len(docs), images.tolist())
        builder.finalize()
    patches = np.random.default_rng(1).standard_normal((16, 2048)).astype(np.float16)
    with indexed.IndexedDatasetBuilder(f"{prefix}_image", "patches", np.float16, (2048,)) as builder:
        for _ in range(NUM_IMAGES):
            builder.add(patches)
        builder.finalize()


def _resident_mb() -> dict:
    """{"private": RssAnon, "mapped": RssFile} of this process in MB (/proc/self/status)."""
    fields = {"RssAnon:": "private", "RssFile:": "mapped"}
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split()[0] if line.strip() else ""
            if key in fields:
                found[fields[key]] = int(line.split()[1]) / 1024
    if len(found) != 2:
        raise RuntimeError("no RssAnon / RssFile in /proc/self/status")
    return found


def _grown(before: dict) -> dict:
    now = _resident_mb()
    return {k: now[k] - before[k] for k in before}


def open_in_this_process(prefix: str) -> dict:
    """What one rank pays to open the dataset and build its first micro-batch (run in a fresh process):
    seconds, and the resident memory that added, private (the rank's own) and mapped (file pages
    of the corpus and index in the page cache, shared by every rank of a node and reclaimable)."""
    import warnings

    from m6_engine.data.dataset import DatasetConfig, PretrainDataset
    from m6_engine.data.tasks import SampleLayout

    tokenizer = _tokenizer()
    layout = SampleLayout(16, 2048, 64, tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
    config = DatasetConfig(prefix, micro_batch_size=4, seed=0)
    before = _resident_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the scan case's "no sample index" warning
        dataset = PretrainDataset(config, layout, tokenizer, dp_rank=1, dp_size=8)
    opened, at_open = time.perf_counter() - start, _grown(before)
    next(dataset)
    return {"open_s": opened, "first_batch_s": time.perf_counter() - start,
            "private_mb_at_open": at_open["private"], "mapped_mb_at_open": at_open["mapped"],
            **{f"{k}_mb_after_first_batch": v for k, v in _grown(before).items()},
            "documents": {name: len(s) for name, s in dataset.streams[0].sources.items()}}


def _open_in_a_fresh_process(prefix: Path) -> dict:
    code = ("import json, sys; from tests.bench.bench_sample_index import open_in_this_process; "
            "print(json.dumps(open_in_this_process(sys.argv[1])))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code, str(prefix)], capture_output=True, text=True, check=True,
                         cwd=root, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    num_docs = 20_000 if quick else 10_000_000
    tokenizer = _tokenizer()
    marker = tokenizer.encode(preprocess.DEFAULT_ANSWER_MARKER)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "corpus"
        start = time.perf_counter()
        write_corpus(prefix, num_docs, tokenizer)
        write_s = time.perf_counter() - start
        texts = indexed.open_tokens(f"{prefix}_text")
        start = time.perf_counter()
        reference = sample_index.scan_sources(texts, np.asarray(marker))
        scan_s = time.perf_counter() - start
        start = time.perf_counter()
        sample_index.build_sample_index(prefix, marker, progress=False)
        build_s = time.perf_counter() - start
        built = sample_index.open_sample_index(prefix).sources
        same = all(np.array_equal(built[s], reference[s]) for s in sample_index.SOURCES)
        with_index = _open_in_a_fresh_process(prefix)
        sample_index.sample_index_path(prefix).unlink()
        without_index = _open_in_a_fresh_process(prefix)
        index_mb = (sample_index._HEADER.size + 8 * sum(len(reference[s]) for s in sample_index.SOURCES)) / 2**20
    result = {"documents": num_docs, "corpus_write_s": write_s, "build_index_s": build_s, "reference_scan_s": scan_s,
              "scan_over_build": scan_s / build_s, "index_equals_scan": same, "index_file_mb": index_mb,
              "open_with_index": with_index, "open_without_index": without_index,
              "open_speedup": without_index["first_batch_s"] / with_index["first_batch_s"],
              "goal": "with the index: < 1 s and < 50 MB resident per rank"}
    print_table(f"dataset start-up, {num_docs:,} documents ({index_mb:.0f} MB sample index)",
                ["rank opens", "open s", "to 1st batch s", "private MB", "mapped MB", "after 1st batch"],
                [[name, r["open_s"], r["first_batch_s"], r["private_mb_at_open"], r["mapped_mb_at_open"],
                  f"{r['private_mb_after_first_batch']:.1f} + {r['mapped_mb_after_first_batch']:.1f} mapped"]
                 for name, r in (("with sample index", with_index), ("scanning (no index)", without_index))])
    print(f"offline build {build_s:.2f} s vs per-document scan {scan_s:.2f} s ({scan_s / build_s:.1f}x); "
          f"same lists: {same}")
    write_json(out_dir, "bench_sample_index", result)
    return result


if __name__ == "__main__":
    quick_main(run, __doc__.splitlines()[0])
