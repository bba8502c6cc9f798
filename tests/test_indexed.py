"""Indexed datasets: round trip, copy-free access, merge, atomic builds, bad files; preprocess of text."""

import json
import struct

import numpy as np
import pytest

from m6_engine.data import indexed, preprocess
from m6_engine.data.indexed import IndexedDatasetBuilder, IndexFormatError


def _build_tokens(prefix, items, vocab_size=1000, image_ids=None):
    with IndexedDatasetBuilder(prefix, "tokens", indexed.token_dtype(vocab_size), vocab_size=vocab_size) as b:
        for k, item in enumerate(items):
            b.add(item, -1 if image_ids is None else image_ids[k])
        b.finalize()
    return indexed.open_tokens(prefix, vocab_size)


def _build_patches(prefix, n, rng):
    items = [rng.standard_normal((16, 2048)).astype(np.float16) for _ in range(n)]
    with IndexedDatasetBuilder(prefix, "patches", np.float16, (2048,)) as b:
        for item in items:
            b.add(item)
        b.finalize()
    return items


def test_token_dtype():
    assert indexed.token_dtype(21128) == np.uint16
    assert indexed.token_dtype(65536) == np.uint16
    assert indexed.token_dtype(65537) == np.int32
    with pytest.raises(ValueError):
        indexed.token_dtype(0)


@pytest.mark.parametrize("vocab_size", [1000, 70000])
def test_token_round_trip(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    items = [rng.integers(0, vocab_size, size=n) for n in (5, 0, 17, 1)]
    ds = _build_tokens(tmp_path / "t", items, vocab_size, image_ids=[3, -1, 0, -1])
    assert len(ds) == 4 and ds.kind == "tokens" and ds.vocab_size == vocab_size
    assert ds.dtype == indexed.token_dtype(vocab_size)
    for k, item in enumerate(items):
        assert np.array_equal(ds[k], item)
    assert ds.sizes.tolist() == [5, 0, 17, 1] and ds.image_ids.tolist() == [3, -1, 0, -1]
    assert np.array_equal(ds[-1], items[-1])
    with pytest.raises(IndexError, match="out of range"):
        ds[4]


def test_access_is_copy_free(tmp_path):
    ds = _build_tokens(tmp_path / "t", [np.arange(10), np.arange(7)])
    view = ds[1]
    assert isinstance(view.base, np.memmap) or isinstance(view.base.base, np.memmap)
    assert np.shares_memory(view, ds._data)
    t = ds.tensor(1)
    assert t.data_ptr() == view.__array_interface__["data"][0]
    t[0] = 99  # copy-on-write mapping: the file is never modified
    assert indexed.open_tokens(tmp_path / "t")[1][0] == 0


def test_patch_round_trip(tmp_path):
    items = _build_patches(tmp_path / "p", 3, np.random.default_rng(1))
    ds = indexed.open_patches(tmp_path / "p", num_patches=16, feature_dim=2048)
    assert ds.kind == "patches" and ds.dtype == np.float16 and ds[0].shape == (16, 2048)
    for k in range(3):
        assert np.array_equal(ds[k], items[k])
    with pytest.raises(IndexFormatError, match="2048-d patch features, expected 1024"):
        indexed.open_patches(tmp_path / "p", feature_dim=1024)


def test_empty_dataset(tmp_path):
    ds = _build_tokens(tmp_path / "e", [])
    assert len(ds) == 0 and ds.sizes.size == 0


def test_merge_shifts_image_ids(tmp_path):
    a = _build_tokens(tmp_path / "a", [[1, 2], [3]], image_ids=[0, -1])
    b = _build_tokens(tmp_path / "b", [[4, 5, 6]], image_ids=[1])
    m = indexed.merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"], image_offsets=[0, 10])
    assert [m[i].tolist() for i in range(len(m))] == [[1, 2], [3], [4, 5, 6]]
    assert m.image_ids.tolist() == [0, -1, 11]
    assert len(a) + len(b) == len(m)
    _build_tokens(tmp_path / "c", [[1]], vocab_size=2000)
    with pytest.raises(IndexFormatError, match="c.idx"):
        indexed.merge(tmp_path / "m2", [tmp_path / "a", tmp_path / "c"])
    assert not (tmp_path / "m2.idx").exists() and not list(tmp_path.glob(".m2*"))


def test_builder_rejects_bad_items(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "t", "tokens", np.uint16, vocab_size=10) as b:
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            b.add([1, 10])
        with pytest.raises(ValueError, match="row shape"):
            b.add([[1, 2]])
    with pytest.raises(ValueError, match="vocab_size"):
        IndexedDatasetBuilder(tmp_path / "u", "tokens", np.uint16)


def test_interrupted_build_leaves_nothing_and_keeps_old(tmp_path):
    _build_tokens(tmp_path / "t", [[1, 2, 3]])
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(tmp_path / "t", "tokens", np.uint16, vocab_size=1000) as b:
            b.add([7, 7])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.idx"]  # no temporary left
    assert indexed.open_tokens(tmp_path / "t")[0].tolist() == [1, 2, 3]  # the old dataset is intact


def _expect_error(prefix, match):
    with pytest.raises(IndexFormatError, match=match):
        indexed.IndexedDataset(prefix)


def test_bad_files_are_named(tmp_path):
    prefix = tmp_path / "t"
    _build_tokens(prefix, [np.arange(20), np.arange(5)])
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    bin_.write_bytes(good_bin[:-2])  # truncated data
    _expect_error(prefix, r"t\.bin is 48 bytes, its index .*t\.idx records 50")
    bin_.write_bytes(good_bin)

    idx.write_bytes(good_idx[:-8])  # truncated index arrays
    _expect_error(prefix, r"t\.idx is \d+ bytes.*truncated")
    idx.write_bytes(good_idx[:20])  # truncated header
    _expect_error(prefix, r"t\.idx is truncated")

    idx.write_bytes(b"MMIDIDX\x00\x00" + good_idx[9:])  # a foreign (Megatron) index
    _expect_error(prefix, r"t\.idx is not an m6-engine index file")

    idx.write_bytes(good_idx[:8] + struct.pack("<I", 99) + good_idx[12:])  # another version
    _expect_error(prefix, r"t\.idx has index format version 99")

    header = indexed._HEADER.size  # sizes[0] follows the header: 20 -> 21 no longer tiles the .bin
    idx.write_bytes(good_idx[:header] + struct.pack("<i", 21) + good_idx[header + 4:])
    _expect_error(prefix, r"t\.idx: item offsets do not tile")

    idx.write_bytes(good_idx)
    bin_.unlink()
    _expect_error(prefix, r"t\.bin does not exist")


def test_verify_detects_a_mismatched_pair(tmp_path):
    a = _build_tokens(tmp_path / "a", [[1, 2, 3], [4]])
    _build_tokens(tmp_path / "b", [[5, 6, 7], [8]])  # same sizes, other data
    a.verify()
    (tmp_path / "a.bin").write_bytes((tmp_path / "b.bin").read_bytes())
    stale = indexed.open_tokens(tmp_path / "a")  # sizes agree: only the digest can tell
    with pytest.raises(IndexFormatError, match=r"a\.bin does not match the digest recorded in .*a\.idx"):
        stale.verify()
    m = indexed.merge(tmp_path / "m", [tmp_path / "b", tmp_path / "b"])
    m.verify()  # merge re-hashes what it copies
    assert indexed.main(["info", "--verify", str(tmp_path / "m")]) == 0
    assert indexed.main(["info", "--verify", str(tmp_path / "a")]) == 1


def test_vocab_fingerprint(tmp_path):
    fp1, fp2 = b"\x01" * 16, b"\x02" * 16
    for name, fp in (("x", fp1), ("y", fp2)):
        with IndexedDatasetBuilder(tmp_path / name, "tokens", np.uint16, vocab_size=100, vocab_hash=fp) as b:
            b.add([1, 2])
            b.finalize()
    assert indexed.open_tokens(tmp_path / "x", 100, fp1).vocab_hash == fp1
    with pytest.raises(IndexFormatError, match="x.idx was tokenised with another tokenizer of the same size"):
        indexed.open_tokens(tmp_path / "x", 100, fp2)
    with pytest.raises(IndexFormatError, match="cannot merge .*y.idx"):
        indexed.merge(tmp_path / "m", [tmp_path / "x", tmp_path / "y"])
    _build_tokens(tmp_path / "z", [[1]], vocab_size=100)  # no fingerprint recorded: not compared
    assert len(indexed.open_tokens(tmp_path / "z", 100, fp2)) == 1


def test_open_checks_kind_and_vocab(tmp_path):
    _build_tokens(tmp_path / "t", [[1]], vocab_size=1000)
    _build_patches(tmp_path / "p", 1, np.random.default_rng(0))
    with pytest.raises(IndexFormatError, match="vocab of 1000 entries, the tokenizer has 21128"):
        indexed.open_tokens(tmp_path / "t", vocab_size=21128)
    with pytest.raises(IndexFormatError, match="holds patches, expected tokens"):
        indexed.open_tokens(tmp_path / "p")
    with pytest.raises(IndexFormatError, match="holds tokens, expected patches"):
        indexed.open_patches(tmp_path / "t")


def test_indexed_cli(tmp_path, capsys):
    _build_tokens(tmp_path / "a", [[1, 2]])
    _build_tokens(tmp_path / "b", [[3]])
    assert indexed.main(["merge", "--output-prefix", str(tmp_path / "m"), str(tmp_path / "a"),
                         str(tmp_path / "b")]) == 0
    assert "tokens, 2 items" in capsys.readouterr().out
    assert indexed.main(["info", str(tmp_path / "missing")]) == 1


# ---- preprocess of text-only documents -------------------------------------------------------------

def write_vocab(path, texts):
    """A BERT vocab holding the specials and every character of ``texts``."""
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars) + "\n", encoding="utf-8")
    return path


def test_preprocess_text_and_merge(tmp_path):
    from m6_engine.data.doc_tokens import tokenizer_fingerprint
    from m6_engine.data.tokenizer import BertWordPieceTokenizer

    docs = [{"title": f"标题{i}号文", "content": f"第{i}段正文，内容各不相同。" * (i + 1)} for i in range(25)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs) + "{broken\n",
                   encoding="utf-8")
    vocab = write_vocab(tmp_path / "vocab.txt", [d["title"] + d["content"] for d in docs])
    tok = BertWordPieceTokenizer(vocab)
    reports = {}
    for workers in (1, 2):
        config = preprocess.PreprocessConfig(vocab_file=str(vocab), workers=workers, chunk_lines=4)
        reports[workers] = preprocess.preprocess([src], tmp_path / f"w{workers}", config, progress=False)
    assert (tmp_path / "w1_text.bin").read_bytes() == (tmp_path / "w2_text.bin").read_bytes()
    ds = indexed.open_tokens(tmp_path / "w2_text", tok.vocab_size)
    assert len(ds) == 25 and (ds.image_ids == -1).all()
    assert ds[3].tolist() == tok.encode(docs[3]["title"] + "\n" + docs[3]["content"])
    r = reports[2]
    assert r.documents == 25 and r.skipped["bad_json"] == 1 and r.tokens == int(ds.sizes.sum())
    assert len(indexed.open_patches(tmp_path / "w2_image")) == 0
    meta = json.loads((tmp_path / "w2_meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size and meta["report"]["documents"] == 25
    assert meta["tokenizer"]["vocab_hash"] == ds.vocab_hash.hex() == tokenizer_fingerprint(tok).hex()
    assert meta["extractor"] is None  # no images
    texts, images = preprocess.merge_corpora(tmp_path / "m", [tmp_path / "w1", tmp_path / "w2"])
    assert len(texts) == 50 and len(images) == 0 and texts[28].tolist() == ds[3].tolist()


def test_rerun_removes_the_old_corpus_first(tmp_path, monkeypatch):
    """A re-run that fails between the image and the text dataset leaves no stale text index behind."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"content": "第一段正文，内容足够长了。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    vocab = write_vocab(tmp_path / "vocab.txt", ["第一段正文，内容足够长了。"])
    config = preprocess.PreprocessConfig(vocab_file=str(vocab))
    preprocess.preprocess([src], tmp_path / "c", config, progress=False)
    assert (tmp_path / "c_text.idx").exists() and (tmp_path / "c_meta.json").exists()

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(preprocess, "ordered_map", fail)  # dies after the image dataset, in the tokenising pass
    with pytest.raises(RuntimeError, match="interrupted"):
        preprocess.preprocess([src], tmp_path / "c", config, progress=False)
    assert (tmp_path / "c_image.idx").exists()
    assert not (tmp_path / "c_text.idx").exists() and not (tmp_path / "c_meta.json").exists()
