"""A checkpoint records the inputs its model reads (vocabulary, image-feature extractor), and what
uses the model refuses other ones: ``generate``'s --extractor / --vocab, finetuning's corpus."""

import argparse
import dataclasses
import json
import re
import shutil
import types
from pathlib import Path

import pytest

from m6_engine.checkpoint.folders import FORMAT, FORMAT_VERSION, MANIFEST
from m6_engine.config import ConfigError, ModelConfig
from m6_engine.data.dataset import DatasetError
from m6_engine.data.model_inputs import (
    VOCAB_FILE, ModelInputs, check_extractor, corpus_extractor, describe_extractor, same_extractor)
from m6_engine.data.vision import ExtractorConfig
from tests.distributed import run_ranks
from tests.training_job import build_corpus, small_job

PIXELS = {"name": "pixels", "weights": None, "random_weights": False, "seed": 0, "device": "cpu",
          "pixels_grid": 14}
EDGES = {**PIXELS, "name": "pixels_edges"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))   # the demo's pixels_edges features


def _fake_checkpoint(folder: Path, inputs: dict | None, config=None) -> Path:
    """A checkpoint folder holding only a manifest: enough for the checks that read it first."""
    folder.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": 1, "layout": {}, "files": {},
                "config": config, "inputs": inputs}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


# ---- the extractor of a corpus, and when two are the same

def test_corpus_extractor_is_read_from_its_metadata(corpus, tmp_path):
    assert corpus_extractor(corpus.train)["name"] == "pixels_edges"
    assert corpus_extractor(tmp_path / "no_such_corpus") is None


def test_a_merge_of_corpora_with_different_extractors_is_refused(tmp_path):
    for name, extractor in (("a", PIXELS), ("b", EDGES)):
        (tmp_path / f"{name}_meta.json").write_text(json.dumps({"extractor": extractor}))
    (tmp_path / "ab_meta.json").write_text(json.dumps({"merged_from": [str(tmp_path / "a"), str(tmp_path / "b")]}))
    with pytest.raises(DatasetError, match=r"ab_meta.json: the corpus merges image features of different "
                                           r"extractors .*pixels \(pixels_grid 14\).*pixels_edges"):
        corpus_extractor(tmp_path / "ab")
    (tmp_path / "aa_meta.json").write_text(json.dumps({"merged_from": [str(tmp_path / "a")] * 2}))
    assert corpus_extractor(tmp_path / "aa") == PIXELS


def test_which_extractors_give_the_same_features():
    assert same_extractor(PIXELS, {**PIXELS, "device": "cuda"})          # where it runs: no matter
    assert not same_extractor(PIXELS, EDGES)
    assert not same_extractor(PIXELS, {**PIXELS, "pixels_grid": 7})
    resnet = {**PIXELS, "name": "resnet50", "weights": "/data/r50.pth"}
    assert same_extractor(resnet, {**resnet, "weights": "/elsewhere/r50.pth"})   # the same file, moved
    assert not same_extractor(resnet, {**resnet, "random_weights": True})
    assert same_extractor(None, PIXELS)                                   # unknown: nothing to refuse
    with pytest.raises(ConfigError, match=r"--extractor pixels uses pixels \(pixels_grid 14\), but "
                                          r"checkpoint c was trained on features of pixels_edges"):
        check_extractor(PIXELS, EDGES, chosen_what="--extractor pixels", recorded_what="checkpoint c")
    assert describe_extractor(None) == "no recorded extractor"


# ---- generate: --extractor and --vocab against what the checkpoint records

def _args(extractor=None, weights=None):
    return argparse.Namespace(extractor=extractor, resnet_weights=weights)


def test_generate_takes_the_recorded_extractor_and_refuses_another():
    from m6_engine.generate import image_extractor

    assert image_extractor(_args(), EDGES, "ckpt") == ExtractorConfig("pixels_edges")
    assert image_extractor(_args("pixels_edges"), EDGES, "ckpt") == ExtractorConfig("pixels_edges")
    with pytest.raises(ConfigError, match="--extractor pixels uses pixels .* but checkpoint ckpt was trained "
                                          "on features of pixels_edges"):
        image_extractor(_args("pixels"), EDGES, "ckpt")
    with pytest.raises(ConfigError, match="checkpoint ckpt does not record the extractor .* give --extractor"):
        image_extractor(_args(), None, "ckpt")
    assert image_extractor(_args("pixels"), None, "ckpt") == ExtractorConfig("pixels")
    resnet = {**PIXELS, "name": "resnet50", "weights": "/train/machine/r50.pth", "device": "cuda"}
    here = image_extractor(_args(weights="/here/r50.pth"), resnet, "ckpt")
    assert here == ExtractorConfig("resnet50", weights="/here/r50.pth")   # this machine's file, default device


def test_an_explicit_vocab_other_than_the_recorded_one_is_refused(corpus, tmp_path):
    from m6_engine.data.doc_tokens import tokenizer_fingerprint
    from m6_engine.data.tokenizer import BertWordPieceTokenizer
    from m6_engine.inference.loading import load_inference_model

    recorded = tokenizer_fingerprint(BertWordPieceTokenizer(corpus.vocab_file)).hex()
    other = tmp_path / "other_vocab.txt"
    other.write_text(Path(corpus.vocab_file).read_text(encoding="utf-8") + "多\n", encoding="utf-8")
    model = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, vocab_size=corpus.vocab_size + 8,
                        max_text_positions=32)
    config = {"model": dataclasses.asdict(model), "data": {}}
    folder = _fake_checkpoint(tmp_path / "step_000001", {"vocab_hash": recorded, "extractor": EDGES}, config)
    state = types.SimpleNamespace(pp_size=1)   # only pp_size is read before the check
    with pytest.raises(ConfigError, match=re.escape(f"vocabulary {str(other)!r} is not the vocabulary "
                                                    f"checkpoint {folder} was trained with")):
        load_inference_model(folder, state, vocab_file=str(other))


# ---- training records them; finetuning checks its corpus against them

def _save_one_step(corpus_folder: str, save_dir: str) -> None:
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state
    from tests.training_job import Corpus

    job = small_job(Corpus(Path(corpus_folder)), steps=1, train={"save_dir": save_dir, "save_interval": 1})
    state = init_state()
    Trainer(job, state, make_datasets(job, state)[0]).run()


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("run")
    run_ranks(_save_one_step, 1, str(corpus.folder), str(save_dir))
    (folder,) = sorted(save_dir.glob("step_*"))
    return folder


def test_a_trainer_checkpoint_records_its_inputs_and_holds_its_vocab(corpus, saved):
    from m6_engine.checkpoint import read_manifest
    from m6_engine.data.doc_tokens import tokenizer_fingerprint
    from m6_engine.data.tokenizer import BertWordPieceTokenizer

    manifest = read_manifest(saved)
    inputs = ModelInputs.from_manifest(manifest)
    assert inputs.vocab_hash == tokenizer_fingerprint(BertWordPieceTokenizer(corpus.vocab_file)).hex()
    assert inputs.extractor["name"] == "pixels_edges"
    assert (saved / VOCAB_FILE).read_bytes() == Path(corpus.vocab_file).read_bytes()
    assert VOCAB_FILE in manifest["files"]   # digested: a damaged vocab is a damaged checkpoint


def test_finetuning_on_other_features_or_vocab_is_refused_before_any_rank_starts(corpus, saved, tmp_path):
    from m6_engine.training import check_inputs

    def job_from(checkpoint):
        job = small_job(corpus)
        return dataclasses.replace(job, train=dataclasses.replace(job.train, init_from=str(checkpoint)))

    check_inputs(job_from(saved))                       # the same inputs: accepted
    check_inputs(job_from(saved.parent))                # a directory: its latest checkpoint
    manifest = json.loads((saved / MANIFEST).read_text())
    pixels = _fake_checkpoint(tmp_path / "pixels" / "step_000001",
                              {**manifest["inputs"], "extractor": PIXELS}, manifest["config"])
    with pytest.raises(ConfigError, match=re.escape(f"data.corpus = {corpus.train!r} uses pixels_edges "
                                                    f"(pixels_grid 14), but train.init_from = {str(pixels)!r} "
                                                    f"was trained on features of pixels (pixels_grid 14)")):
        check_inputs(job_from(pixels))
    other_vocab = _fake_checkpoint(tmp_path / "vocab" / "step_000001",
                                   {**manifest["inputs"], "vocab_hash": "0" * 32}, manifest["config"])
    with pytest.raises(ConfigError, match=r"data.vocab_file = .* is not the vocabulary train.init_from = .* "
                                          r"was trained with"):
        check_inputs(job_from(other_vocab))
    older = _fake_checkpoint(tmp_path / "older" / "step_000001", None, manifest["config"])
    check_inputs(job_from(older))                       # recorded nothing: nothing to compare


def test_inference_reads_the_checkpoints_own_vocab(corpus, saved, tmp_path):
    """Copied to a machine without the training run's vocab file: the stored one is read."""
    moved = tmp_path / "moved" / saved.name
    shutil.copytree(saved, moved)
    manifest = json.loads((moved / MANIFEST).read_text())
    manifest["config"]["data"]["vocab_file"] = str(tmp_path / "on_the_training_machine" / "vocab.txt")
    (moved / MANIFEST).write_text(json.dumps(manifest))
    result = run_ranks(_load_tokenizer_size, 1, str(moved))
    assert result == [len(Path(corpus.vocab_file).read_text(encoding="utf-8").splitlines())]


def _load_tokenizer_size(folder: str) -> int:
    from m6_engine.inference.loading import load_inference_model
    from tests.distributed import init_state

    loaded = load_inference_model(folder, init_state())
    assert loaded.extractor["name"] == "pixels_edges"
    return loaded.tokenizer.vocab_size
