"""PretrainDataset: the four tasks from a preprocessed corpus, epochs, dp sharding, resume, stop, vocab checks."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from m6_engine.data import indexed, preprocess, synthetic, vision
from m6_engine.data.dataset import DatasetConfig, DatasetError, PretrainDataset
from m6_engine.data.tasks import TASKS, SampleLayout, TaskMixer
from m6_engine.data.tokenizer import BertWordPieceTokenizer
from tests.test_indexed import write_vocab

NUM_TEXT_DOCS = 20


def _text_docs():
    """Text-only documents of 5..60 characters: some longer than a 14- or 30-token window."""
    return [{"id": f"t{i}", "content": "".join(chr(0x4E00 + 97 * i + 13 * j) for j in range(5 + 3 * i))}
            for i in range(NUM_TEXT_DOCS)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus of 20 text documents and 6 images x (caption + 3 questions); its vocab and tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    shapes = synthetic.write_synthetic(root / "raw", synthetic.SyntheticConfig(num_images=6, seed=1))
    text = root / "raw" / "text.jsonl"
    text.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in _text_docs()), encoding="utf-8")
    contents = [json.loads(line)["content"] for p in (shapes, text) for line in open(p, encoding="utf-8")]
    vocab = write_vocab(root / "vocab.txt", contents)
    config = preprocess.PreprocessConfig(vocab_file=str(vocab), extractor=vision.ExtractorConfig("pixels"))
    preprocess.preprocess([text, shapes], root / "out" / "c", config, progress=False)
    return str(root / "out" / "c"), vocab, BertWordPieceTokenizer(vocab)


def _layout(tok, max_text_positions=32):
    return SampleLayout(num_patches=16, patch_feature_dim=2048, max_text_positions=max_text_positions,
                        pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id)


def _dataset(corpus, dp_rank=0, dp_size=1, max_text_positions=32, **kw):
    prefix, _, tok = corpus
    return PretrainDataset(DatasetConfig(prefix, **kw), _layout(tok, max_text_positions), tok, dp_rank, dp_size)


def _take(ds, n):
    return [next(ds) for _ in range(n)]


def _rows(batch):
    """Per-sample tuples of every field, for comparing streams."""
    fields = [f.name for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None]
    return [tuple(getattr(batch, k)[i].numpy().tobytes() for k in fields) for i in range(batch.batch_size)]


def _complete_text(batch, i):
    """Token ids of sample i's complete text between [CLS] and [SEP]."""
    p, v = int(batch.prefix_len[i]), int(batch.valid_len[i])
    return batch.tokens[i, p + 1:v - 1].tolist()


def _rows_of_texts_starting(pairs, ids):
    """Image rows of the image-text documents that begin with ``ids`` (targets are truncated to fit)."""
    return set().union(*(rows for text, rows in pairs.items() if list(text[:len(ids)]) == ids))


def test_samples_are_the_tasks_of_the_mixer(corpus):
    prefix, _, tok = corpus
    ds = _dataset(corpus, micro_batch_size=4, seed=3)
    texts = indexed.open_tokens(f"{prefix}_text")
    images = indexed.open_patches(f"{prefix}_image")
    text_docs = [texts[d].tolist() for d in range(len(texts)) if texts.image_ids[d] < 0]
    pairs = {}
    for d in range(len(texts)):
        if texts.image_ids[d] >= 0:
            pairs.setdefault(tuple(texts[d].tolist()), set()).add(int(texts.image_ids[d]))
    marker = tok.encode("答：")
    mixer = TaskMixer({t: 1.0 for t in TASKS}, 3)
    seen = set()
    for batch in _take(ds, 20):
        for i, g in enumerate(batch.sample_index.tolist()):
            task = TASKS[int(batch.task_ids[i])]
            seen.add(task)
            assert task == mixer.task_of(g)
            complete = _complete_text(batch, i)
            has_image = task in ("image_to_text", "multimodal_to_text")
            assert int(batch.num_image_patches[i]) == (16 if has_image else 0)
            if not has_image:  # a window of a text document
                assert any(complete == doc[k:k + len(complete)] for doc in text_docs for k in range(len(doc)))
                if task == "language_modelling":
                    assert int(batch.prefix_len[i]) == 0
                continue
            masked = batch.tokens[i, 16:int(batch.prefix_len[i])].tolist()
            if task == "image_to_text":  # captions only: never a question-answer text
                assert masked == [] and complete[:2] != tok.encode("问：")
                rows = _rows_of_texts_starting(pairs, complete)
            elif masked[-len(marker):] == marker:  # a question: the answer is decoded
                assert masked[:2] == tok.encode("问：")
                rows = _rows_of_texts_starting(pairs, masked + complete)
            else:  # a caption with one span masked
                assert masked.count(tok.mask_id) == 1
                rows = _rows_of_texts_starting(pairs, complete)
            assert rows and any(np.array_equal(batch.patches[i].numpy(), images[r].astype(np.float32)) for r in rows)
    assert seen == set(TASKS)


def test_each_epoch_reads_every_document_once(corpus):
    _, _, tok = corpus
    # 128 text positions: every document fits whole, so the targets are the documents themselves
    ds = _dataset(corpus, task_weights={"language_modelling": 1.0}, micro_batch_size=5, seed=7,
                  max_text_positions=128)
    expected = sorted(tok.encode(d["content"]) for d in _text_docs())
    epochs = []
    for _ in range(2):
        batches = _take(ds, NUM_TEXT_DOCS // 5)
        epochs.append([_complete_text(b, i) for b in batches for i in range(5)])
    assert sorted(epochs[0]) == expected and sorted(epochs[1]) == expected
    assert epochs[0] != epochs[1]  # reshuffled
    assert ds.epochs() == {"text": 2.0, "captions": 0.0, "pairs": 0.0}


def test_dp_ranks_split_the_single_process_stream(corpus):
    whole = _take(_dataset(corpus, micro_batch_size=4), 5)
    ranks = [_take(_dataset(corpus, r, 2, micro_batch_size=2), 5) for r in range(2)]
    for m in range(5):
        assert _rows(ranks[0][m]) + _rows(ranks[1][m]) == _rows(whole[m])

    class Coords:  # tensor-parallel peers share a dp coordinate, whatever their tp rank
        dp_rank, dp_size = 1, 2

    prefix, _, tok = corpus
    peer = PretrainDataset.for_rank(DatasetConfig(prefix, micro_batch_size=2), _layout(tok), tok, Coords())
    assert [_rows(b) for b in _take(peer, 5)] == [_rows(b) for b in ranks[1]]


def test_resume_from_state_dict(corpus):
    ds = _dataset(corpus, micro_batch_size=3, seed=5)
    _take(ds, 4)
    state = json.loads(json.dumps(ds.state_dict()))  # survives a checkpoint's serialisation
    assert state["position"] == 12 and sum(state["corpora"][0]["draws"].values()) == 12
    after = [_rows(b) for b in _take(ds, 4)]
    resumed = _dataset(corpus, micro_batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert [_rows(b) for b in _take(resumed, 4)] == after
    # resumed with two data-parallel ranks of half the micro-batch: the same samples
    halves = [_dataset(corpus, r, 2, micro_batch_size=1, seed=5) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    rows = [_rows(next(halves[0])) + _rows(next(halves[1])) for _ in range(6)]
    assert sum(rows, []) == sum(after, [])
    other = _dataset(corpus, seed=6)
    with pytest.raises(DatasetError, match="another seed or blend"):
        other.load_state_dict(state)
    earlier = {"position": 12, "draws": state["corpora"][0]["draws"], "seed": 5,
               "documents": state["corpora"][0]["documents"]}  # a state of the order before keyed permutations
    with pytest.raises(DatasetError, match="earlier m6-engine with another sample order"):
        resumed.load_state_dict(earlier)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_stop_ends_on_a_step_boundary(corpus, dp_size):
    micro_batch_size = 2 // dp_size
    counts = []
    for rank in range(dp_size):
        ds = _dataset(corpus, rank, dp_size, task_weights={"text_denoising": 1.0, "language_modelling": 1.0},
                      micro_batch_size=micro_batch_size, num_microbatches=3, exhausted="stop")
        counts.append(len(list(ds)))
        assert ds.streams[0].draws["text"] == 18
    # steps of 6 samples (all ranks): 3 steps read 18 of the 20 documents; the 4th would need 24, so
    # it does not start, although its first micro-batch alone (samples 18, 19) would still fit
    assert counts == [3 * 3] * dp_size
    wrap = _dataset(corpus, task_weights={"language_modelling": 1.0}, micro_batch_size=3, num_microbatches=2)
    assert len(_take(wrap, 20)) == 20  # 60 samples out of 20 documents: wraps


def test_tokenizer_must_match_the_corpus(corpus, tmp_path):
    prefix, vocab, tok = corpus
    lines = vocab.read_text(encoding="utf-8").splitlines()
    bigger = tmp_path / "bigger.txt"
    bigger.write_text("\n".join(lines + ["额外"]) + "\n", encoding="utf-8")
    other = BertWordPieceTokenizer(bigger)
    with pytest.raises(indexed.IndexFormatError, match=f"vocab of {tok.vocab_size} entries, the tokenizer has"):
        PretrainDataset(DatasetConfig(prefix), _layout(other), other)
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join(lines[:5] + [lines[6], lines[5]] + lines[7:]) + "\n", encoding="utf-8")
    other = BertWordPieceTokenizer(swapped)
    with pytest.raises(indexed.IndexFormatError, match="another tokenizer of the same size"):
        PretrainDataset(DatasetConfig(prefix), _layout(other), other)
    cased = BertWordPieceTokenizer(vocab, lower_case=False)
    with pytest.raises(indexed.IndexFormatError, match="another tokenizer of the same size"):
        PretrainDataset(DatasetConfig(prefix), _layout(cased), cased)


def test_configuration_errors(corpus, tmp_path):
    prefix, vocab, tok = corpus
    text_only = tmp_path / "t.jsonl"
    text_only.write_text(json.dumps(_text_docs()[3], ensure_ascii=False) + "\n", encoding="utf-8")
    preprocess.preprocess([text_only], tmp_path / "t", preprocess.PreprocessConfig(vocab_file=str(vocab)),
                          progress=False)
    with pytest.raises(DatasetError, match=r"task image_to_text has weight 1.0 but corpus .* no caption \(image, no answer marker\)"):
        PretrainDataset(DatasetConfig(str(tmp_path / "t")), _layout(tok), tok)
    ds = PretrainDataset(DatasetConfig(str(tmp_path / "t"), task_weights={"language_modelling": 1}), _layout(tok), tok)
    assert next(ds).tokens.shape == (1, 16 + 32)
    with pytest.raises(DatasetError, match="exhausted"):
        DatasetConfig(prefix, exhausted="never")
    with pytest.raises(DatasetError, match="dp_rank 2"):
        PretrainDataset(DatasetConfig(prefix), _layout(tok), tok, 2, 2)
    with pytest.raises(indexed.IndexFormatError, match="c_text.idx does not exist|c_text.bin does not exist"):
        PretrainDataset(DatasetConfig(str(tmp_path / "c")), _layout(tok), tok)
    bad = SampleLayout(16, 1024, 32, tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id)
    with pytest.raises(indexed.IndexFormatError, match="2048-d patch features, expected 1024"):
        PretrainDataset(DatasetConfig(prefix), bad, tok)


def test_batch_tensors(corpus):
    batch = next(_dataset(corpus, micro_batch_size=6, seed=2))
    assert batch.tokens.shape == (6, 48) and batch.tokens.dtype == torch.int64
    assert batch.patches.shape == (6, 16, 2048) and batch.patches.dtype == torch.float32
    assert (batch.valid_len <= 48).all() and (batch.prefix_len < batch.valid_len).all()
    assert batch.loss_mask.sum(dim=1).gt(0).all()
