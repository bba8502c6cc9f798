"""The sample index: the vectorised build equals the per-document scan it replaces, the dataset
opens through it without reading the corpus, and a stale or damaged index is never used."""

import numpy as np
import pytest

from m6_engine.data import corpus_stream, indexed, preprocess, sample_index
from m6_engine.data.dataset import DatasetConfig, PretrainDataset
from m6_engine.data.sample_index import SOURCES, SampleIndexError, build_sources, scan_sources
from tests.test_dataset import _layout, _rows, _take, corpus  # noqa: F401 -- the module's corpus fixture


def _random_tokens(tmp_path, marker, seed, num_docs=400, image_every=2):
    """Token documents with ``marker`` planted inside some, split across a document boundary in
    others, at a document's very end, plus empty documents; every other document has an image."""
    rng = np.random.default_rng(seed)
    prefix = tmp_path / f"t{seed}_{len(marker)}"
    docs = []
    for d in range(num_docs):
        ids = rng.integers(5, 12, size=int(rng.integers(0, 30))).tolist()   # 5..11: marker ids are 1..4
        kind = rng.integers(6)
        if kind == 0 and ids:
            at = int(rng.integers(len(ids) + 1))
            ids = ids[:at] + list(marker) + ids[at:]
        elif kind == 1:
            ids = ids + list(marker)                             # at the very end
        elif kind == 2 and len(marker) > 1:
            ids = ids + list(marker[:1])                         # the rest starts the next document
            docs.append(ids)
            docs.append(list(marker[1:]) + rng.integers(5, 12, size=3).tolist())
            continue
        elif kind == 3:
            ids = ids + list(marker[:-1])                        # a prefix of the marker only
        docs.append(ids)
    with indexed.IndexedDatasetBuilder(prefix, "tokens", np.uint16, vocab_size=16) as b:
        for d, ids in enumerate(docs):
            b.add(np.asarray(ids, dtype=np.uint16), d % 7 if d % image_every == 0 else -1)
        b.finalize()
    return indexed.open_tokens(prefix)


@pytest.mark.parametrize("marker", [(1,), (1, 2), (3, 1, 4)])
@pytest.mark.parametrize("chunk", [5, 64, 1 << 24])
def test_vectorised_build_equals_the_per_document_scan(tmp_path, monkeypatch, marker, chunk):
    monkeypatch.setattr(sample_index, "_SCAN_CHUNK", chunk)   # chunk edges inside documents and markers
    for seed in range(3):
        texts = _random_tokens(tmp_path, marker, seed)
        fast, slow = build_sources(texts, np.asarray(marker)), scan_sources(texts, np.asarray(marker))
        for source in SOURCES:
            assert np.array_equal(fast[source], slow[source]), (source, seed)
        assert 0 < len(slow.captions) < len(slow.pairs)       # both kinds occur: the test can fail
    texts = _random_tokens(tmp_path, (1, 2), 9)
    assert np.array_equal(build_sources(texts, np.zeros(0, np.int64)).captions, scan_sources(texts, []).pairs)


def test_preprocess_writes_an_index_the_dataset_opens_without_scanning(corpus, monkeypatch):  # noqa: F811
    prefix, _, tok = corpus
    index = sample_index.open_sample_index(prefix)
    texts = indexed.open_tokens(preprocess.text_prefix(prefix))
    reference = scan_sources(texts, np.asarray(tok.encode("答："), dtype=np.int64))
    for source in SOURCES:
        assert np.array_equal(index.sources[source], reference[source])
    plain = [_rows(b) for b in _take(PretrainDataset(DatasetConfig(prefix, micro_batch_size=4, seed=3),
                                                     _layout(tok), tok), 6)]

    def forbidden(*args, **kwargs):
        raise AssertionError("the dataset read the whole corpus although it has a sample index")

    monkeypatch.setattr(corpus_stream, "scan_sources", forbidden)
    monkeypatch.setattr(indexed.IndexedDataset, "_check_offsets", forbidden)
    ds = PretrainDataset(DatasetConfig(prefix, micro_batch_size=4, seed=3), _layout(tok), tok)
    assert isinstance(ds.streams[0].sources["pairs"].docs, np.memmap)       # shared pages, not a copy
    assert [_rows(b) for b in _take(ds, 6)] == plain


def test_without_an_index_the_dataset_scans_and_gives_the_same_stream(corpus, tmp_path):  # noqa: F811
    prefix, _, tok = corpus
    copy = tmp_path / "c"
    for suffix in ("_text.idx", "_text.bin", "_image.idx", "_image.bin"):
        (tmp_path / f"c{suffix}").write_bytes(open(f"{prefix}{suffix}", "rb").read())
    config = dict(micro_batch_size=4, seed=3)
    with pytest.warns(UserWarning, match="it has none.*--index"):
        scanned = PretrainDataset(DatasetConfig(str(copy), **config), _layout(tok), tok)
    indexed_ds = PretrainDataset(DatasetConfig(prefix, **config), _layout(tok), tok)
    assert [_rows(b) for b in _take(scanned, 5)] == [_rows(b) for b in _take(indexed_ds, 5)]
    # another answer marker: the index sorted captions by "答：", so it is not used
    with pytest.warns(UserWarning, match="answer-marker tokens .*--answer-marker '问：'"):
        PretrainDataset(DatasetConfig(prefix, answer_marker="问：", **config), _layout(tok), tok)
    assert preprocess.main(["--index", str(copy), "--vocab", str(corpus[1]), "--no-progress"]) == 0
    reopened = PretrainDataset(DatasetConfig(str(copy), **config), _layout(tok), tok)   # no warning now
    assert isinstance(reopened.streams[0].sources["text"].docs, np.memmap)


def test_a_stale_or_damaged_index_is_not_used(corpus, tmp_path):  # noqa: F811
    prefix, vocab, tok = corpus
    root = tmp_path / "c"
    for suffix in ("_text.idx", "_text.bin", "_image.idx", "_image.bin", "_samples.idx"):
        (tmp_path / f"c{suffix}").write_bytes(open(f"{prefix}{suffix}", "rb").read())
    # the corpus rebuilt (another text dataset) under an old index: detected by the recorded digest
    texts = indexed.open_tokens(f"{root}_text")
    with indexed.IndexedDatasetBuilder(f"{root}_text", "tokens", texts.dtype, vocab_size=texts.vocab_size,
                                       vocab_hash=texts.vocab_hash) as b:
        for i in range(len(texts) - 1):
            b.add(texts[i], int(texts.image_ids[i]))
        b.finalize()
    with pytest.warns(UserWarning, match="built for another .*c_text"):
        PretrainDataset(DatasetConfig(str(root)), _layout(tok), tok)
    path = sample_index.sample_index_path(root)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SampleIndexError, match="truncated or corrupt.*--index"):
        PretrainDataset(DatasetConfig(str(root)), _layout(tok), tok)
    path.write_bytes(b"not an index at all")
    with pytest.raises(SampleIndexError, match="not an m6-engine sample index"):
        sample_index.open_sample_index(root)
    with pytest.raises(SampleIndexError, match="at most 16"):
        sample_index.build_sample_index(root, list(range(17)))
    assert path.read_bytes() == b"not an index at all"       # a refused build leaves the file as it was


def test_an_index_opened_without_the_offset_check_still_bounds_every_read(tmp_path):
    with indexed.IndexedDatasetBuilder(tmp_path / "t", "tokens", np.uint16, vocab_size=10) as b:
        for n in (3, 4, 5):
            b.add(np.arange(n, dtype=np.uint16))
        b.finalize()
    idx = indexed.index_path(tmp_path / "t")
    raw = bytearray(idx.read_bytes())
    sizes_at = indexed._HEADER.size
    raw[sizes_at + 4:sizes_at + 8] = np.asarray([10], dtype="<i4").tobytes()   # item 1 claims 10 tokens
    idx.write_bytes(bytes(raw))
    with pytest.raises(indexed.IndexFormatError, match="offsets do not tile"):
        indexed.IndexedDataset(tmp_path / "t")
    light = indexed.IndexedDataset(tmp_path / "t", check_offsets=False)   # O(1): the last item is intact
    assert light[0].tolist() == [0, 1, 2] and light[2].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(indexed.IndexFormatError, match="item 1 .* lies outside"):
        light[1]
    raw[sizes_at + 8:sizes_at + 12] = np.asarray([4], dtype="<i4").tobytes()    # the last item too short
    idx.write_bytes(bytes(raw))
    with pytest.raises(indexed.IndexFormatError, match="last item does not end"):
        indexed.IndexedDataset(tmp_path / "t", check_offsets=False)
