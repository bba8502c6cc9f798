"""Tokenizer throughput on one core: MB/s of UTF-8 text, ours vs Hugging Face's (figures, not pass/fail).

Corpora, synthetic and deterministic (seed 0), about 512 KB of UTF-8 each, drawn from the default
vocab's own CJK characters with Zipf weights (frequent characters first, as in real text):
  zh-lines       Chinese sentences of 10-60 characters with Chinese punctuation (captions, questions);
  zh-documents   the same kind of sentences joined into documents of about 1000 characters;
  mixed          Chinese documents with English words and numbers between the sentences.
Each is encoded text by text with ``BertWordPieceTokenizer.encode`` (median of 3 timed passes after
one warm-up pass, which fills the word cache as a long preprocessing run would), and with
Hugging Face's ``BertTokenizer`` on the same vocab: its Python API
(``convert_tokens_to_ids(tokenize(text))``) and its Rust backend alone
(``backend_tokenizer.encode(text)``, one text at a time). The process is pinned to one core while
timing where the platform allows it. Target (issue 4): ours >= 1 MB/s on Chinese text.

Usage: ``python -m tests.bench.bench_tokenizer --out DIR`` (writes ``DIR/bench_tokenizer.json``),
or ``run(out_dir)`` from another script. Needs the default vocab (``make install``).
"""

import contextlib
import os
import random
from typing import Callable, Dict, List

from m6_engine.data.tokenizer import BertWordPieceTokenizer, default_vocab_path, read_vocab
from tests.bench.common import out_dir_main, print_table, time_fn, write_json

CORPUS_BYTES = 512 * 1024
TARGET_MB_S = 1.0
_ZH_PUNCT = "，。！？；：、"
_MIXED_WORDS = ["the", "model", "transformer", "GPU", "2021", "3.14", "BERT", "M6", "tokenization", "100%"]


def _sentence(rng: random.Random, chars: List[str], weights: List[float]) -> str:
    return "".join(rng.choices(chars, weights, k=rng.randint(10, 60))) + rng.choice(_ZH_PUNCT)


def make_corpora(vocab_file: str, seed: int = 0) -> Dict[str, List[str]]:
    """The three corpora of the module docstring, each about CORPUS_BYTES of UTF-8."""
    rng = random.Random(seed)
    chars = [t for t in read_vocab(vocab_file) if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    weights = [1.0 / (rank + 1) for rank in range(len(chars))]

    def fill(make: Callable[[], str]) -> List[str]:
        texts, size = [], 0
        while size < CORPUS_BYTES:
            texts.append(make())
            size += len(texts[-1].encode("utf-8"))
        return texts

    def document(mixed: bool) -> str:
        parts = []
        while sum(map(len, parts)) < 1000:
            parts.append(_sentence(rng, chars, weights))
            if mixed:
                parts.append(" " + " ".join(rng.choices(_MIXED_WORDS, k=rng.randint(1, 4))) + " ")
        return "".join(parts)

    return {"zh-lines": fill(lambda: _sentence(rng, chars, weights)),
            "zh-documents": fill(lambda: document(mixed=False)),
            "mixed": fill(lambda: document(mixed=True))}


@contextlib.contextmanager
def one_core():
    """Pin this process to one core while inside (yields whether it could)."""
    if not hasattr(os, "sched_setaffinity"):
        yield False
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, before)


def _mb_per_s(fn: Callable[[str], object], texts: List[str], nbytes: int) -> float:
    seconds = time_fn(lambda: [fn(t) for t in texts], "cpu", warmup=1, iters=3)
    return nbytes / seconds / 1e6


def _hugging_face(vocab_file: str):
    try:
        import transformers  # noqa: PLC0415 - a test dependency; the benchmark runs without it
    except ImportError:
        return None, None
    return transformers.BertTokenizer(vocab=vocab_file, do_lower_case=True), transformers.__version__


def run(out_dir: str) -> dict:
    vocab_file = str(default_vocab_path())
    ours = BertWordPieceTokenizer(vocab_file)
    hf, hf_version = _hugging_face(vocab_file)
    corpora = make_corpora(vocab_file)
    load_before = os.getloadavg()[0]  # the figures scale with what else the machine runs
    results, rows = {}, []
    with one_core() as pinned:
        for name, texts in corpora.items():
            nbytes = sum(len(t.encode("utf-8")) for t in texts)
            r = {"texts": len(texts), "bytes": nbytes, "ours_mb_s": _mb_per_s(ours.encode, texts, nbytes)}
            if hf is not None:
                r["hf_python_mb_s"] = _mb_per_s(lambda t: hf.convert_tokens_to_ids(hf.tokenize(t)),
                                                texts, nbytes)
                backend = hf.backend_tokenizer
                r["hf_rust_mb_s"] = _mb_per_s(lambda t: backend.encode(t, add_special_tokens=False).ids,
                                              texts, nbytes)
                r["ids_equal_hf"] = all(ours.encode(t) == backend.encode(t, add_special_tokens=False).ids
                                        for t in texts)
            results[name] = r
            rows.append([name, len(texts), nbytes, r["ours_mb_s"], r.get("hf_python_mb_s", "-"),
                         r.get("hf_rust_mb_s", "-"), r.get("ids_equal_hf", "-")])
    print_table(f"tokenizer throughput, MB/s of UTF-8 ({'one core' if pinned else 'not pinned'}; "
                f"target >= {TARGET_MB_S} MB/s on Chinese)",
                ["corpus", "texts", "bytes", "ours", "hf python", "hf rust", "ids = hf"], rows)
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    data = {"one_core": pinned, "target_mb_s": TARGET_MB_S, "transformers": hf_version,
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "corpora": results}
    print(f"wrote {write_json(out_dir, 'bench_tokenizer', data)}")
    return data


def main(argv=None):
    out_dir_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
