"""Bad checkpoints given to a training job: a path that does not exist (before any process group),
an empty directory, a truncated or missing shard, missing DCP metadata or manifest, a checkpoint of
another model shape or vocabulary. Each is a CheckpointError naming train.load, the checkpoint and
the file or tensor; a half-written save (no manifest) is never taken for complete.

A rank SIGKILLed during a save, and ``load=auto`` resuming from the last complete checkpoint, are
tests/test_checkpoint.py::test_process_killed_mid_save_leaves_previous_checkpoint_loadable and
tests/test_training.py::test_killed_rank_restarts_from_the_latest_checkpoint."""

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest

from m6_engine.checkpoint import CheckpointError
from m6_engine.checkpoint.folders import CheckpointNotFoundError
from m6_engine.training import check_inputs
from tests.distributed import run_ranks
from tests.training_job import Corpus, build_corpus, small_job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _with_train(job, **fields):
    return dataclasses.replace(job, train=dataclasses.replace(job.train, **fields))


@pytest.mark.parametrize("key", ["load", "init_from"])
def test_path_that_does_not_exist_is_refused_before_any_rank_starts(corpus, tmp_path, key):
    missing = str(tmp_path / "no_such_run" / "step_000010")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"train.{key} = {missing!r} does not exist")):
        check_inputs(_with_train(small_job(corpus), **{key: missing}))


def _damage(folder: Path, how: str) -> None:
    shard = sorted(folder.glob("*.distcp"))[0]
    if how == "truncate_shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif how == "remove_shard":
        shard.unlink()
    elif how == "remove_metadata":
        (folder / ".metadata").unlink()
    elif how == "remove_manifest":
        (folder / "complete").unlink()


CASES = ("empty_dir", "truncate_shard", "remove_shard", "remove_metadata", "remove_manifest",
         "narrower_model", "fewer_layers", "larger_vocab")


def _bad_loads(corpus_folder: str, work: str) -> dict:
    """Rank function: save a 2-step run, then resume a fresh Trainer from each damaged copy."""
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state

    corpus = Corpus(Path(corpus_folder))
    work = Path(work)
    state = init_state()
    job = small_job(corpus, steps=2, train={"save_dir": str(work / "run")})
    Trainer(job, state, make_datasets(job, state)[0]).run()
    saved = work / "run" / "step_000002"
    out = {"saved": str(saved)}
    for case in CASES:
        # a damaged copy keeps its step_* name: a folder of that name is a checkpoint, never a directory
        target = work / case if case == "empty_dir" else work / case / saved.name
        if case == "empty_dir":
            target.mkdir()
        else:
            shutil.copytree(saved, target)
            _damage(target, case)
        model = {"narrower_model": {"hidden_size": 32, "num_heads": 2},
                 "fewer_layers": {"num_layers": 1},
                 "larger_vocab": {"vocab_size": corpus.vocab_size + 300}}.get(case, {})
        bad = small_job(corpus, steps=2, model=model, train={"load": str(target)})
        trainer = Trainer(bad, state, make_datasets(bad, state)[0])
        try:
            trainer.resume()
            out[case] = None
        except CheckpointError as error:
            out[case] = (type(error).__name__, str(error), str(target))
    return out


@pytest.fixture(scope="module")
def bad_loads(corpus, tmp_path_factory):
    (result,) = run_ranks(_bad_loads, 1, str(corpus.folder), str(tmp_path_factory.mktemp("ckpt")))
    return result


@pytest.mark.parametrize("case, kind, words", [
    ("empty_dir", "CheckpointNotFoundError", ["no complete checkpoint in {target}"]),
    ("truncate_shard", "CheckpointCorruptError", ["checkpoint {target} is damaged", "__0_0.distcp"]),
    ("remove_shard", "CheckpointCorruptError", ["checkpoint {target} is damaged", "__0_0.distcp"]),
    ("remove_metadata", "CheckpointCorruptError", ["checkpoint {target} is damaged", ".metadata"]),
    ("remove_manifest", "CheckpointCorruptError", ["{target}", "incomplete"]),   # half-written
    ("narrower_model", "CheckpointError", ["global shape"]),
    ("fewer_layers", "CheckpointError", ["model tensor(s) this model lacks", "layers.1."]),
    ("larger_vocab", "CheckpointError", ["global shape"]),
])
def test_bad_checkpoint_names_train_load_and_the_file(bad_loads, case, kind, words):
    assert bad_loads[case] is not None, f"{case}: the load succeeded"
    got_kind, message, target = bad_loads[case]
    assert got_kind == kind, (got_kind, message)
    assert message.startswith(f"train.load = {target!r}: "), message
    for word in words:
        assert word.format(target=target) in message, (word, message)


def test_missing_init_from_is_left_to_the_trainer_when_a_resume_may_win(corpus, tmp_path):
    """With train.load set, a resumable checkpoint wins and init_from is never read: not refused early."""
    check_inputs(_with_train(small_job(corpus), load="auto", save_dir=str(tmp_path / "run"),
                             init_from=str(tmp_path / "deleted_source")))
