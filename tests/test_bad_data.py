"""Bad preprocessed corpora and vocab files: ``m6_engine.training.check_inputs`` (what the training
CLI runs before any process group) names the config key, the file and what is wrong."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from m6_engine.config import ConfigError
from m6_engine.data.dataset import DatasetError
from m6_engine.data.indexed import IndexFormatError
from m6_engine.training import check_inputs
from tests.training_job import build_corpus, small_job

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def copy(corpus, tmp_path):
    """A writable copy of the corpus folder: (its job, its train prefix)."""
    folder = tmp_path / "copy"
    shutil.copytree(corpus.folder / "corpus", folder)
    prefix = str(folder / "train")
    return _with_data(small_job(corpus), corpus=prefix), Path(prefix)


def _with_data(job, **fields):
    return dataclasses.replace(job, data=dataclasses.replace(job.data, **fields))


def test_good_corpus_passes(corpus):
    check_inputs(small_job(corpus, evaluate=True))


def _truncate(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, file, message", [
    ("remove", "train_text.bin", "train_text.bin does not exist (an indexed dataset is <prefix>.idx + <prefix>.bin)"),
    ("remove", "train_text.idx", "train_text.idx does not exist"),
    ("remove", "train_image.bin", "train_image.bin does not exist"),
    ("remove", "train_image.idx", "train_image.idx does not exist"),
    ("truncate", "train_text.bin", "train_text.bin is {n} bytes, its index"),
    ("truncate", "train_image.bin", "train_image.bin is {n} bytes, its index"),
    ("truncate", "train_text.idx", "train_text.idx is {n} bytes, its header"),
    ("empty", "train_text.idx", "train_text.idx"),
    ("magic", "train_text.idx", "train_text.idx is not an m6-engine index file"),
    ("swap", "train_text", "train_text.idx holds patches, expected tokens"),
])
def test_damaged_corpus_names_the_key_and_file(copy, damage, file, message):
    job, prefix = copy
    path = prefix.parent / file
    if damage == "remove":
        path.unlink()
    elif damage == "truncate":
        _truncate(path, path.stat().st_size - 7)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "magic":
        raw = bytearray(path.read_bytes())
        raw[:4] = b"JUNK"
        path.write_bytes(bytes(raw))
    elif damage == "swap":                  # the image dataset's files under the text name
        for ext in (".idx", ".bin"):
            shutil.copy(prefix.parent / f"train_image{ext}", prefix.parent / f"train_text{ext}")
    n = path.stat().st_size if path.exists() else 0
    with pytest.raises(IndexFormatError) as info:
        check_inputs(job)
    text = str(info.value)
    assert text.startswith(f"data.corpus = {str(prefix)!r}: "), text
    assert message.format(n=n) in text, text


@pytest.mark.parametrize("positions", [2, 4])
def test_text_positions_too_few_for_any_sample(corpus, positions):
    with pytest.raises(ConfigError, match=re.escape(
            f"model.max_text_positions = {positions} is too small to train on: a sample needs at least 5")):
        check_inputs(small_job(corpus, model={"max_text_positions": positions}))


def test_missing_eval_corpus_names_data_eval_corpus(corpus, tmp_path):
    missing = str(tmp_path / "gone" / "heldout")
    with pytest.raises(IndexFormatError, match=re.escape(
            f"data.eval_corpus = {missing!r}: {missing}_text.idx does not exist")):
        check_inputs(_with_data(small_job(corpus), eval_corpus=missing))


def test_corpus_of_another_vocab(corpus, tmp_path):
    entries = Path(corpus.vocab_file).read_text(encoding="utf-8").split("\n")
    other = tmp_path / "vocab.txt"
    other.write_text("\n".join(entries[:5] + entries[6:]), encoding="utf-8")   # one entry fewer
    with pytest.raises(IndexFormatError, match=re.escape(
            f"was tokenised with a vocab of {corpus.vocab_size} entries, the tokenizer has "
            f"{corpus.vocab_size - 1}: re-run preprocess with this vocab")):
        check_inputs(_with_data(small_job(corpus), vocab_file=str(other)))


def test_empty_corpus_is_refused(corpus, tmp_path):
    """A corpus of zero documents (preprocess on an empty input) cannot feed a task."""
    from m6_engine.data import indexed
    from m6_engine.data.doc_tokens import tokenizer_fingerprint
    from m6_engine.data.tokenizer import BertWordPieceTokenizer
    from m6_engine.training import make_datasets
    from tests.test_training import _OneReplica

    tokenizer = BertWordPieceTokenizer(corpus.vocab_file)
    prefix = tmp_path / "empty"
    with indexed.IndexedDatasetBuilder(f"{prefix}_text", "tokens", indexed.token_dtype(tokenizer.vocab_size),
                                       vocab_size=tokenizer.vocab_size,
                                       vocab_hash=tokenizer_fingerprint(tokenizer)) as builder:
        builder.finalize()
    with indexed.IndexedDatasetBuilder(f"{prefix}_image", "patches", "float16", row_shape=(2048,)) as builder:
        builder.finalize()
    job = _with_data(small_job(corpus), corpus=str(prefix))
    check_inputs(job)                                   # well-formed files...
    with pytest.raises(DatasetError, match=re.escape(   # ...but nothing to sample from
            f"task text_denoising has weight 1.0 but corpus {str(prefix)!r} has no text-only documents")):
        make_datasets(job, _OneReplica())


@pytest.mark.parametrize("lines, message", [
    (None, "vocab file {path!r} does not exist"),
    ([], "vocab file {path!r} is empty"),
    (SPECIALS + ["a", "b", "a"], "vocab file {path!r}: token 'a' on line 8 duplicates line 6"),
    (SPECIALS[1:] + ["a"], "vocab file {path!r} lacks the special token(s) [PAD]"),
    ([t for t in SPECIALS if t != "[CLS]"] + ["a"], "vocab file {path!r} lacks the special token(s) [CLS]"),
    (SPECIALS + ["a", "", "b"], "vocab file {path!r}: line 7 is empty"),
    (b"\xff\xfe[PAD]\n", "vocab file {path!r} is not UTF-8"),
])
def test_bad_vocab_file_names_the_key_and_file(corpus, tmp_path, lines, message):
    path = tmp_path / "vocab.txt"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    elif lines is not None:
        path.write_text("".join(t + "\n" for t in lines), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        check_inputs(_with_data(small_job(corpus), vocab_file=str(path)))
    text = str(info.value)
    assert text.startswith(f"data.vocab_file = {str(path)!r}: "), text
    assert message.format(path=str(path)) in text, text


@pytest.mark.parametrize("case, message", [
    ("missing_input", "preprocess: input '{tmp}/nope.jsonl' does not exist"),
    ("missing_vocab", "preprocess: vocab file '{tmp}/missing.txt' does not exist"),
    ("vocab_without_mask", "preprocess: vocab file '{tmp}/vocab.txt' lacks the special token(s) [MASK]"),
    ("merge_missing", "preprocess: {tmp}/nope_image.idx does not exist"),
    ("workers_0", "preprocess: workers and chunk_lines must be >= 1, got 0 and 1000"),
])
def test_preprocess_cli_bad_input_writes_nothing(tmp_path, capsys, case, message):
    from m6_engine.data import preprocess

    (tmp_path / "docs.jsonl").write_text('{"content": "ab"}\n', encoding="utf-8")
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in SPECIALS[:4] + ["a", "b"]), encoding="utf-8")
    good_vocab = tmp_path / "full.txt"
    good_vocab.write_text("".join(t + "\n" for t in SPECIALS + ["a", "b"]), encoding="utf-8")
    out = tmp_path / "out" / "corpus"
    args = {"missing_input": ["--input", f"{tmp_path}/nope.jsonl", "--vocab", str(good_vocab)],
            "missing_vocab": ["--input", f"{tmp_path}/docs.jsonl", "--vocab", f"{tmp_path}/missing.txt"],
            "vocab_without_mask": ["--input", f"{tmp_path}/docs.jsonl", "--vocab", f"{tmp_path}/vocab.txt"],
            "merge_missing": ["--merge", f"{tmp_path}/nope"],
            "workers_0": ["--input", f"{tmp_path}/docs.jsonl", "--vocab", str(good_vocab), "--workers", "0"],
            }[case]
    assert preprocess.main([*args, "--output-prefix", str(out), "--no-progress"]) == 1
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    leftovers = sorted((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == [], leftovers          # nothing half-written under the output prefix
