"""Benchmark of the data path (figures, not pass/fail): cleaning, tokenising preprocess, patch features.

Text: People's Daily (Jan 1998, ~15 k paragraphs, 1.8 M characters) when it is cached
(``python -m m6_engine.data.people_daily`` fetches it), else the synthetic set's captions and
questions. Vocab: the installed bert-base-chinese ``vocab.txt`` when present, else one built from
the corpus' characters (said in the result).

* clean: ``clean_files`` with ``workers`` processes: documents/s and input MB/s.
* preprocess: tokens/s of the tokenising pass (``PreprocessReport.tokens_per_second``: pool start,
  tokenisation, writing the dataset) with 1 and ``workers`` processes: the issue's figure is the
  2-process one on the 2-core CPU. Also tokens per CPU-second (this process and its workers,
  from ``getrusage``): on a machine shared with other jobs the wall-clock rate depends on them,
  the CPU-time rate much less.
* patch features: images/s of ``write_patch_features`` (decode and cut in ``workers`` processes,
  extract, write fp16) for the ``pixels`` extractor and a random-weight ResNet-50 on ``device``,
  torch using ``workers`` threads.

Usage: ``python -m tests.bench.bench_preprocess [--device cpu|cuda] [--workers 2] [--out DIR]``
(writes ``DIR/bench_preprocess.json``), or ``run(device, out_dir)`` from another script.
"""

import argparse
import json
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch

from m6_engine.data import clean, people_daily, preprocess, synthetic, vision
from m6_engine.data.tokenizer import default_vocab_path
from tests.bench.common import print_table, write_json


def _text_corpus(folder: Path) -> tuple:
    """(JSON-lines path, description) of the benchmark's text."""
    corpus = people_daily.cached_corpus()
    path = folder / "text.jsonl"
    if corpus is not None:
        n = people_daily.write_documents(corpus, path)
        return path, f"People's Daily 1998-01 ({n} paragraphs)"
    config = synthetic.SyntheticConfig(num_images=3000, questions_per_image=5)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(config.num_images):
            for doc in synthetic.documents(config, i)[1]:
                f.write(json.dumps({"content": doc["content"]}, ensure_ascii=False) + "\n")
    return path, "synthetic captions and questions (People's Daily not cached)"


def _vocab(folder: Path, corpus: Path) -> tuple:
    try:
        return default_vocab_path(), "bert-base-chinese (21128)"
    except (FileNotFoundError, ValueError):
        chars = sorted({c for line in open(corpus, encoding="utf-8") for c in json.loads(line)["content"]
                        if not c.isspace()})
        path = folder / "vocab.txt"
        path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars) + "\n", encoding="utf-8")
        return path, f"built from the corpus ({len(chars) + 5}; default vocab not installed)"


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (pool workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _bench_images(folder: Path, device: str, workers: int, num_images: int) -> list:
    src = synthetic.write_synthetic(folder / "shapes", synthetic.SyntheticConfig(num_images=num_images),
                                    workers=workers)
    paths = sorted((src.parent / "images").glob("*.png"))
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(workers)
    try:
        for name in ("pixels", "resnet50"):
            resnet = name == "resnet50"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", vision.RandomWeightsWarning)
                ext = vision.build_extractor(vision.ExtractorConfig(name, random_weights=resnet,
                                                                    device=device if resnet else "cpu"))
            vision.write_patch_features(paths[:2], folder / f"warm_{name}", ext)  # first-call costs out of the timing
            batch = 64 if name == "pixels" or device == "cuda" else 8
            start = time.perf_counter()
            vision.write_patch_features(paths, folder / f"feat_{name}", ext, batch_size=batch, workers=workers)
            rows.append((name, device if resnet else "cpu", len(paths), len(paths) / (time.perf_counter() - start)))
    finally:
        torch.set_num_threads(threads)
    return rows


def run(device: str = "cpu", out_dir: str = "bench-results", workers: int = 2, num_images: int = 0) -> dict:
    """Clean, tokenise and extract on ``device``; print a table, write and return the JSON.

    ``num_images`` defaults to 2000 for a GPU's ResNet-50 and 64 on the CPU (where ResNet-50 runs
    a few images per second: 16 patches of 56 × 56 cost about what one 224 × 224 image does).
    """
    device = torch.device(device).type
    num_images = num_images or (2000 if device == "cuda" else 64)
    with tempfile.TemporaryDirectory(prefix="m6-bench-data-") as tmp:
        folder = Path(tmp)
        corpus, corpus_desc = _text_corpus(folder)
        vocab, vocab_desc = _vocab(folder, corpus)
        start = time.perf_counter()
        report = clean.clean_files([corpus], folder / "clean.jsonl", workers=workers, progress=False)
        clean_s = time.perf_counter() - start
        mb = corpus.stat().st_size / 1e6
        result = {"corpus": corpus_desc, "vocab": vocab_desc, "workers": workers, "cpu_count": os.cpu_count(),
                  "load_average_1min": round(os.getloadavg()[0], 2),
                  "clean": {"documents_in": report.lines, "documents_kept": report.kept, "seconds": round(clean_s, 2),
                            "documents_per_s": round(report.lines / clean_s), "mb_per_s": round(mb / clean_s, 2)},
                  "preprocess": {}}
        for w in sorted({1, workers}):
            config = preprocess.PreprocessConfig(vocab_file=str(vocab), workers=w)
            cpu = _cpu_seconds()
            r = preprocess.preprocess([folder / "clean.jsonl"], folder / f"pp{w}", config, progress=False)
            cpu = _cpu_seconds() - cpu
            result["preprocess"][f"workers_{w}"] = {"tokens": r.tokens, "seconds": round(r.tokenize_seconds, 2),
                                                     "tokens_per_s": round(r.tokens_per_second),
                                                     "cpu_seconds": round(cpu, 2),
                                                     "tokens_per_cpu_s": round(r.tokens / cpu)}
        images = _bench_images(folder, device, workers, num_images)
        result["patch_features"] = {name: {"device": dev, "images": n, "images_per_s": round(ips, 2)}
                                    for name, dev, n, ips in images}
    print(f"corpus: {corpus_desc}; vocab: {vocab_desc}")
    print_table("cleaning + preprocess", ["step", "workers", "rate"],
                [("clean", workers, f"{result['clean']['documents_per_s']} docs/s, {result['clean']['mb_per_s']} MB/s")]
                + [("tokenise", k.split("_")[1], f"{v['tokens_per_s']} tokens/s, {v['tokens_per_cpu_s']} tokens/cpu-s")
                   for k, v in result["preprocess"].items()]
                + [(f"features {name} ({dev})", workers, f"{ips:.2f} images/s") for name, dev, _, ips in images])
    write_json(out_dir, "bench_preprocess", result)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=0, help="default: 2000 on cuda, 64 on the cpu")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    run(args.device, args.out, args.workers, args.images)


if __name__ == "__main__":
    main()
