"""Blending corpora: Megatron's proportions, each corpus read as its own stream, resumable, logged."""

import dataclasses
import json

import numpy as np
import pytest

from m6_engine.config import ConfigError, DataConfig
from m6_engine.data.blend import blend_choice, normalized_weights
from m6_engine.data.dataset import (CorpusWeight, DatasetConfig, DatasetError, PretrainDataset, corpus_seed,
                                    parse_corpora, samples_per_corpus)
from m6_engine.metrics import format_line
from tests.test_dataset import _layout, _rows, _take, corpus  # noqa: F401 -- the module's corpus fixture


@pytest.mark.parametrize("weights", [[1, 1], [0.7, 0.2, 0.1], [3, 1, 1, 5], [1e-3, 1]])
def test_every_prefix_of_the_blend_keeps_the_shares(weights):
    w = normalized_weights(weights)
    counts = [0] * len(w)
    for g in range(5000):
        counts[blend_choice(w, counts, g)] += 1
        n = g + 1
        assert all(abs(c - share * n) <= 1.0 + 1e-9 for c, share in zip(counts, w)), (n, counts)


def test_weights_and_blend_forms_are_checked():
    with pytest.raises(ValueError, match="finite number > 0"):
        normalized_weights([1, 0])
    assert parse_corpora("0.7 a/x 0.3 b/y") == (CorpusWeight("a/x", 0.7, "x"), CorpusWeight("b/y", 0.3, "y"))
    assert parse_corpora("one/c") == (CorpusWeight("one/c", 1.0, "c"),)
    for bad, message in [("0.7 a 0.3", "pairs"), ("x a", "pairs"), ([{"weight": 1}], "'path'"),
                         ([{"path": "a", "wieght": 1}], "unknown keys"), ([{"path": "a/c"}, {"path": "b/c"}], "repeat"),
                         ([{"path": "a", "weight": -1}], "> 0")]:
        with pytest.raises(DatasetError, match=message):
            parse_corpora(bad)
    with pytest.raises(DatasetError, match="either corpus .* or corpora"):
        DatasetConfig()
    with pytest.raises(ConfigError, match="both set"):
        DataConfig(corpus="a", corpora="1 b")
    data = DataConfig(corpora=[{"path": "p/a", "weight": 2}, {"path": "p/b", "name": "forum"}])
    assert data.corpora == ({"path": "p/a", "weight": 2.0, "name": "a"}, {"path": "p/b", "weight": 1.0, "name": "forum"})
    assert data.training_corpora() == {"corpora[0]": "p/a", "corpora[1]": "p/b"}
    assert DataConfig(**json.loads(json.dumps(dataclasses.asdict(data)))) == data   # round-trips a checkpoint


def _blend(prefix, weights, **kw):
    return DatasetConfig(corpora=[{"path": prefix, "weight": w, "name": f"c{k}"} for k, w in enumerate(weights)], **kw)


def test_blended_samples_are_each_corpus_own_stream_in_proportion(corpus):  # noqa: F811
    prefix, _, tok = corpus
    config = _blend(prefix, [3, 1], micro_batch_size=4, seed=11)
    ds = PretrainDataset(config, _layout(tok), tok)
    batches = _take(ds, 10)
    state = ds.state_dict()
    assert samples_per_corpus(state) == {"c0": 30, "c1": 10}
    # replaying the blend rule says which corpus each sample came from; each corpus's samples are,
    # in order, what that corpus alone gives with its own seed
    w, counts, origin = normalized_weights([3, 1]), [0, 0], []
    for g in range(40):
        origin.append(blend_choice(w, counts, g))
        counts[origin[-1]] += 1
    def content(batch):   # sample_index is the global index in the blend, the corpus's own alone
        return _rows(dataclasses.replace(batch, sample_index=None))

    rows = sum((content(b) for b in batches), [])
    for k, n in enumerate(counts):
        alone = PretrainDataset(DatasetConfig(prefix, micro_batch_size=n, seed=corpus_seed(11, k)), _layout(tok), tok)
        assert [r for r, o in zip(rows, origin) if o == k] == content(next(alone))
    assert corpus_seed(11, 0) == 11 and corpus_seed(11, 1) != 11
    assert set(ds.epochs()) == {f"c{k}/{s}" for k in range(2) for s in ("text", "captions", "pairs")}


def test_a_blend_resumes_exactly_and_refuses_another_blend(corpus):  # noqa: F811
    prefix, _, tok = corpus
    ds = PretrainDataset(_blend(prefix, [0.5, 0.3, 0.2], micro_batch_size=3, seed=2), _layout(tok), tok)
    _take(ds, 5)
    state = json.loads(json.dumps(ds.state_dict()))
    after = [_rows(b) for b in _take(ds, 5)]
    halves = [PretrainDataset(_blend(prefix, [0.5, 0.3, 0.2], micro_batch_size=1, seed=2), _layout(tok), tok, r, 3)
              for r in range(3)]
    for h in halves:
        h.load_state_dict(state)
    assert [sum((_rows(next(halves[r])) for r in range(3)), []) for _ in range(5)] == after   # 3 dp ranks
    other = PretrainDataset(_blend(prefix, [0.5, 0.5], micro_batch_size=3, seed=2), _layout(tok), tok)
    with pytest.raises(DatasetError, match="another seed or blend"):
        other.load_state_dict(state)


def test_the_log_line_shows_the_samples_of_each_corpus():
    scalars = {"loss": 1.0, "lr": 1e-4, "loss_scale": 1.0, "grad_norm": 1.0, "skipped_steps": 0, "tokens_per_s": 1.0,
               "tflops_per_device": 0.0, "mfu": 0.0, "step_time_s": 0.1, "peak_memory_gib": 0.0,
               "samples/encyclopedia": 30, "samples/forum": 10}
    assert format_line(1, 2, scalars).endswith("| samples encyclopedia=30 forum=10")


@pytest.fixture(scope="module")
def training_corpus(tmp_path_factory):
    """The trainer tests' corpus (tests/training_job.py): a training and a held-out corpus."""
    from tests.training_job import build_corpus

    return build_corpus(tmp_path_factory.mktemp("training_corpus"))


def _rank_trains_on_a_blend(job_dict, save_dir):
    from m6_engine.config import job_config_from_dict
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state

    job = job_config_from_dict(job_dict, {"train.save_dir": save_dir})
    state = init_state()
    data, _ = make_datasets(job, state)
    trainer = Trainer(job, state, data, log_rank_output=False)
    history = trainer.run()
    resumed_job = job_config_from_dict(job_dict, {"train.save_dir": save_dir, "train.load": "auto",
                                                  "train.train_steps": "3"})
    data, _ = make_datasets(resumed_job, state)
    resumed = Trainer(resumed_job, state, data, log_rank_output=False)
    more = resumed.run()
    counts = lambda h: {k: v for k, v in h.items() if k.startswith("samples/")}  # noqa: E731
    return [counts(h) for h in history + more]


def test_the_trainer_logs_and_checkpoints_the_samples_of_each_corpus(training_corpus, tmp_path):
    from tests.distributed import run_ranks
    from tests.training_job import small_job

    job = small_job(training_corpus, steps=2)
    blend = [{"path": training_corpus.train, "weight": 3, "name": "main"},
             {"path": training_corpus.heldout, "weight": 1, "name": "extra"}]
    job = dataclasses.replace(job, data=dataclasses.replace(job.data, corpus="", corpora=blend))
    (logged,) = run_ranks(_rank_trains_on_a_blend, 1, job.to_dict(), str(tmp_path / "ckpt"))
    # global batch 8 per step; the resumed run continues the blend from the checkpoint's counts
    assert logged == [{"samples/main": 6, "samples/extra": 2}, {"samples/main": 12, "samples/extra": 4},
                      {"samples/main": 18, "samples/extra": 6}], logged


def test_the_launcher_takes_megatron_style_data_path():
    import importlib.util
    from pathlib import Path

    from m6_engine.config import job_config_from_dict

    script = Path(__file__).resolve().parents[1] / "examples" / "pretrain_m6.py"
    spec = importlib.util.spec_from_file_location("pretrain_m6", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--config", "x.yaml", "--data-path", "0.7 data/wiki 0.3 data/forum"])
    job = job_config_from_dict({"data": {"corpus": "data/from_yaml"}}, module.overrides_of(args))
    assert job.data.corpus == "" and job.data.training_corpora() == {"corpora[0]": "data/wiki",
                                                                     "corpora[1]": "data/forum"}
    assert [c["weight"] for c in job.data.corpora] == [0.7, 0.3]
    both = module.parse_args(["--config", "x.yaml", "--data", "a", "--data-path", "1 b"])
    with pytest.raises(ConfigError, match="both set"):
        job_config_from_dict({}, module.overrides_of(both))
