"""The training loop (m6_engine/training.py, examples/pretrain_m6.py) end to end on a small demo corpus.

- Layout parity: whole training steps (AdamW, warm-up + cosine LR, clipping) at (tp, pp, dp) in
  (2,2,1), (1,2,2), (2,1,2) give the per-step losses of (1,1,1) over 10 steps (relative 1e-5), and
  the same held-out loss after them; ZeRO-1 at (1,1,2) gives the unsharded losses (relative 1e-6).
- Resume: with dropout 0.1 at (1,2,1), 3 steps + checkpoint + a new Trainer with load=auto give the
  losses of an uninterrupted 6-step run bit for bit.
- Resharding: a checkpoint of step 3 at (2,2,1) loaded at (1,1,1) and (1,2,2) continues with the
  losses of the uninterrupted (2,2,1) run (relative 1e-5).
- Errors: missing corpus, a corpus tokenised with another vocabulary, batch sizes that do not
  divide, fewer layers than stages, an unknown --set field.
- O2 in the trainer: bf16 parameters train with finite losses and no scaler; fp16 from a 2^40
  loss scale skips steps and halves the scale (hysteresis 2).
- Fault: under torchrun --max-restarts=1, rank 1 killed after step 5 makes the job restart from
  the step-4 checkpoint and finish with the losses of an unkilled run.
- CLI: a short single-process run writes TensorBoard scalars, a checkpoint and a profiler trace.

Ranks run several jobs per launch (tests/training_job.py) to pay process start-up once.
"""

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from m6_engine.config import ConfigError
from tests.distributed import free_port, run_ranks
from tests.training_job import Run, STEPS, fault_job, launch, max_rel, small_job
from tests.training_job import corpus_fixture  # noqa: F401  (provides the module-scoped "corpus" fixture)

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [(2, 2, 1), (1, 2, 2), (2, 1, 2)]
RESHARD_FROM, RESHARD_STOP = 3, 6


def _name(tp, pp, dp):
    return f"({tp},{pp},{dp})"




@pytest.fixture(scope="module")
def four_ranks(corpus, tmp_path_factory):
    """(2,2,1) saving at every 3rd step, (1,2,2), (2,1,2), and (1,2,2) resumed from (2,2,1)'s step 3."""
    save = tmp_path_factory.mktemp("ckpt_221")
    runs = {"(2,2,1)": Run(small_job(corpus, tp=2, pp=2, evaluate=True,
                                     train={"save_dir": str(save), "save_interval": RESHARD_FROM})),
            "(1,2,2)": Run(small_job(corpus, tp=1, pp=2, evaluate=True)),
            "(2,1,2)": Run(small_job(corpus, tp=2, pp=1, evaluate=True))}
    runs["reshard (1,2,2)"] = Run(small_job(corpus, pp=2, train={"load": str(save / "step_000003")}),
                                  stop_after=RESHARD_STOP)
    return launch(4, runs) | {"save": save}


@pytest.fixture(scope="module")
def one_rank(corpus, four_ranks):
    """(1,1,1), (1,1,1) resumed from (2,2,1)'s step 3, and the O2 runs at a smaller size."""
    o2_model = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "max_text_positions": 32}
    o2_train = {"train_steps": 4, "micro_batch": 1, "global_batch": 2}
    runs = {
        "(1,1,1)": Run(small_job(corpus, evaluate=True)),
        "reshard (1,1,1)": Run(small_job(corpus, train={"load": str(four_ranks["save"] / "step_000003")}),
                               stop_after=RESHARD_STOP),
        "bf16": Run(small_job(corpus, model=o2_model, train=o2_train, optimizer={"precision": "bf16"})),
        "fp16": Run(small_job(corpus, model=o2_model, train=o2_train,
                              optimizer={"precision": "fp16", "initial_loss_scale": 2.0 ** 40})),
    }
    return launch(1, runs)


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):
    """(1,1,2) without ZeRO and with stages 1, 2 and 3; the resume runs at (1,2,1) with dropout."""
    whole, split = tmp_path_factory.mktemp("ckpt_whole"), tmp_path_factory.mktemp("ckpt_split")
    runs = {
        "(1,1,2)": Run(small_job(corpus, steps=5)),
        "(1,1,2) zero": Run(small_job(corpus, steps=5, optimizer={"optimizer_sharding": True})),
        "(1,1,2) zero2": Run(small_job(corpus, steps=5, optimizer={"zero_stage": 2})),
        "(1,1,2) zero3": Run(small_job(corpus, steps=5, optimizer={"zero_stage": 3})),
        "(1,1,2) zero3 recompute": Run(small_job(corpus, steps=5, optimizer={"zero_stage": 3},
                                                 train={"recompute": "full"})),
        "uninterrupted": Run(fault_job(corpus, save_dir=str(whole), save_interval=3)),
        "first 3 steps": Run(fault_job(corpus, save_dir=str(split), save_interval=3), stop_after=3),
        "resumed": Run(fault_job(corpus, save_dir=str(split), save_interval=3, load="auto")),
    }
    return launch(2, runs)


# ---- parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=[_name(*x) for x in LAYOUTS])
def test_layout_parity_of_training_steps(layout, four_ranks, one_rank, record_property):
    ours, reference = four_ranks[_name(*layout)], one_rank["(1,1,1)"]
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    rel = max_rel(ours["losses"], reference["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"{_name(*layout)}: max relative loss difference to (1,1,1) over {STEPS} steps: {rel:.2e}")
    assert rel <= 1e-5, (ours["losses"], reference["losses"])
    assert reference["losses"][STEPS] < reference["losses"][1]     # it trains
    assert ours["eval"].keys() == reference["eval"].keys() and "loss/image_to_text" in ours["eval"]
    assert max_rel(ours["eval"], reference["eval"]) <= 1e-5


def test_zero1_matches_unsharded(two_ranks, record_property):
    plain, sharded = two_ranks["(1,1,2)"], two_ranks["(1,1,2) zero"]
    rel = max_rel(sharded["losses"], plain["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"ZeRO-1 at (1,1,2): max relative loss difference to unsharded: {rel:.2e}")
    assert len(plain["losses"]) == 5 and rel <= 1e-6
    grad_norms = [(h["grad_norm"], g["grad_norm"]) for h, g in zip(plain["history"], sharded["history"])]
    assert all(abs(a - b) <= 1e-5 * a for a, b in grad_norms), grad_norms
    # fp32: 8 bytes of Adam moments per parameter (the master is the parameter), halved at dp = 2
    # up to the shard boundaries' alignment.
    print(f"optimizer state on dp rank 0, bytes per parameter: {plain['optimizer_bytes_per_param']:.2f} "
          f"unsharded, {sharded['optimizer_bytes_per_param']:.2f} with ZeRO-1")
    assert plain["optimizer_bytes_per_param"] == 8
    assert 3.9 <= sharded["optimizer_bytes_per_param"] <= 4.1


@pytest.mark.parametrize("stage", ["2", "3", "3 recompute"])
def test_zero2_and_zero3_trainers_match_unsharded(two_ranks, stage):
    # The Trainer wraps the stage for zero_stage (parallel.data_parallel_options): M6's layers are
    # the ZeRO-3 units; with full recomputation a layer is gathered again for its recomputed forward.
    plain, sharded = two_ranks["(1,1,2)"], two_ranks[f"(1,1,2) zero{stage}"]
    rel = max_rel(sharded["losses"], plain["losses"])
    print(f"ZeRO-{stage} at (1,1,2): max relative loss difference to unsharded: {rel:.2e}")
    assert len(sharded["losses"]) == 5 and rel <= 1e-5


# ---- checkpoints --------------------------------------------------------------------------------

def test_resume_is_bit_exact(two_ranks):
    whole = two_ranks["uninterrupted"]["losses"]
    first, resumed = two_ranks["first 3 steps"]["losses"], two_ranks["resumed"]["losses"]
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert {**first, **resumed} == whole


def test_dropout_is_on_in_the_resume_runs(two_ranks, one_rank):
    # With dropout 0.1 the first loss differs from the same model's without dropout: the
    # resume test above restores dropout streams, not a deterministic forward.
    dropout_first = two_ranks["uninterrupted"]["losses"][1]
    assert dropout_first != pytest.approx(one_rank["(1,1,1)"]["losses"][1], rel=1e-4)


@pytest.mark.parametrize("target", ["(1,1,1)", "(1,2,2)"])
def test_resharded_resume_continues_the_run(target, four_ranks, one_rank, record_property):
    resumed = (one_rank if target == "(1,1,1)" else four_ranks)[f"reshard {target}"]["losses"]
    source = four_ranks[_name(2, 2, 1)]["losses"]
    expected = {step: source[step] for step in range(RESHARD_FROM + 1, RESHARD_STOP + 1)}
    rel = max_rel(resumed, expected)
    record_property("max_rel_loss_diff", rel)
    print(f"(2,2,1) step {RESHARD_FROM} -> {target}: max relative loss difference over steps "
          f"{RESHARD_FROM + 1}..{RESHARD_STOP}: {rel:.2e}")
    assert rel <= 1e-5, (resumed, expected)


# ---- O2 in the trainer --------------------------------------------------------------------------

def test_bf16_trains_without_a_scaler(one_rank):
    run = one_rank["bf16"]
    assert run["param_dtype"] == "torch.bfloat16"
    assert run["optimizer_bytes_per_param"] == 12         # fp32 master + two fp32 moments
    assert one_rank["(1,1,1)"]["optimizer_bytes_per_param"] == 8   # fp32: the master is the parameter
    assert [h["loss_scale"] for h in run["history"]] == [1.0] * 4
    assert run["history"][-1]["skipped_steps"] == 0
    assert all(0 < loss < 20 for loss in run["losses"].values()), run["losses"]


def test_fp16_overflow_skips_steps_and_halves_the_scale(one_rank):
    run = one_rank["fp16"]
    assert run["param_dtype"] == "torch.float16"
    # 2^40 * loss overflows fp16 activations' gradients: every step skips; the scale is kept for
    # the first overflow (hysteresis 2) and halved from the second on.
    assert [h["loss_scale"] for h in run["history"]] == [2.0 ** 40, 2.0 ** 40, 2.0 ** 39, 2.0 ** 38]
    assert [h["skipped_steps"] for h in run["history"]] == [1, 2, 3, 4]
    assert all(0 < loss < 20 for loss in run["losses"].values()), run["losses"]


# ---- errors -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _OneReplica:
    """The part of a ParallelState that make_datasets reads."""

    dp_rank: int = 0
    dp_size: int = 1


def _with_data(job, **fields):
    return dataclasses.replace(job, data=dataclasses.replace(job.data, **fields))


def test_missing_corpus_names_the_path(corpus, tmp_path):
    from m6_engine.data.indexed import IndexFormatError
    from m6_engine.training import make_datasets

    job = small_job(corpus)
    missing = str(tmp_path / "nowhere" / "train")
    with pytest.raises(IndexFormatError, match=re.escape(f"{missing}_text.idx does not exist")):
        make_datasets(_with_data(job, corpus=missing), _OneReplica())
    with pytest.raises(ConfigError, match="data.corpus is empty"):
        make_datasets(_with_data(job, corpus=""), _OneReplica())


def test_corpus_of_another_vocabulary_is_refused(corpus, tmp_path):
    from m6_engine.data.indexed import IndexFormatError
    from m6_engine.training import make_datasets

    entries = Path(corpus.vocab_file).read_text(encoding="utf-8").split("\n")
    shorter = tmp_path / "vocab.txt"
    shorter.write_text("\n".join(entries[:-2]) + "\n", encoding="utf-8")     # one entry fewer
    job = _with_data(small_job(corpus), vocab_file=str(shorter))
    with pytest.raises(IndexFormatError, match=re.escape(
            f"{corpus.train}_text.idx was tokenised with a vocab of {corpus.vocab_size} entries, "
            f"the tokenizer has {corpus.vocab_size - 1}")):
        make_datasets(job, _OneReplica())


def test_model_vocabulary_smaller_than_the_tokenizer_is_refused(corpus):
    from m6_engine.training import make_datasets

    job = small_job(corpus, model={"vocab_size": corpus.vocab_size - 1})
    with pytest.raises(ConfigError, match=re.escape(
            f"the tokenizer's vocabulary ({corpus.vocab_size} entries) is larger than "
            f"model.vocab_size = {corpus.vocab_size - 1}")):
        make_datasets(job, _OneReplica())


@pytest.mark.parametrize("overrides, world, message", [
    ({"train.global_batch": "12", "train.micro_batch": "2"}, 4,
     r"TrainConfig.global_batch = 12 is not divisible by micro_batch \* dp = 2 \* 4"),
    ({"train.global_batch": "9", "train.micro_batch": "2"}, 1,
     "TrainConfig.global_batch = 9 is not divisible by TrainConfig.micro_batch = 2"),
    ({"parallel.pp": "4"}, 4, "ModelConfig.num_layers = 2 is fewer than pp = 4"),
    ({"parallel.tp": "3"}, 6, "ModelConfig.hidden_size = 64 is not divisible by tp = 3"),
    ({"parallel.tp": "2", "parallel.pp": "2"}, 6, r"world size 6 is not divisible by tp \* pp = 2 \* 2"),
])
def test_layout_and_batch_errors(corpus, overrides, world, message):
    from m6_engine.config import job_config_from_dict
    from m6_engine.training import check_job

    with pytest.raises(ConfigError, match=message):
        check_job(job_config_from_dict(small_job(corpus).to_dict(), overrides), world)


def _pretrain_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_m6", ROOT / "examples" / "pretrain_m6.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("item, message", [
    ("train.no_such_field=1", "TrainConfig has no field 'no_such_field'"),
    ("nosection.lr=1", "override 'nosection.lr' must be section.field"),
    ("optimizer.lr=fast", "OptimizerConfig.lr expects float, got 'fast'"),
])
def test_unknown_or_bad_set_override(item, message):
    with pytest.raises(ConfigError, match=message):
        _pretrain_main()(["--config", str(ROOT / "examples" / "configs" / "tiny.yaml"), "--set", item])


# ---- fault tolerance ----------------------------------------------------------------------------

def _fault_run(corpus, tmp_path, *kill):
    """The fault worker under torchrun with one restart; (completed process, log tail, save, out)."""
    save, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
               "--monitor-interval=0.2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               str(ROOT / "tests" / "training_job.py"), "--data", str(corpus.folder),
               "--save", str(save), "--out", str(out), *kill]
    # torchrun's c10d rendezvous shares its TCPStore with the workers and keeps it across restarts:
    # a restarted group reads the dead attempt's addresses (pytorch/pytorch#135712). Opt out.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return done, done.stdout[-4000:] + done.stderr[-4000:], save, out


def test_killed_rank_restarts_from_the_latest_checkpoint(corpus, two_ranks, tmp_path):
    done, log, save, out = _fault_run(corpus, tmp_path, "--kill-after", "5")
    assert done.returncode == 0, log
    assert not (out / "losses_attempt0.json").exists(), log        # the first attempt was killed
    assert "resumed from" in done.stdout and "step_000004 at step 4" in done.stdout, log
    restarted = {int(k): v for k, v in json.loads((out / "losses_attempt1.json").read_text()).items()}
    expected = two_ranks["uninterrupted"]["losses"]
    assert restarted == {step: expected[step] for step in (5, 6)}
    assert sorted(p.name for p in save.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]


def test_rank_killed_during_a_save_resumes_from_the_previous_complete_checkpoint(corpus, two_ranks, tmp_path):
    # Rank 0 dies publishing step 4's save: shards and manifest written, folder not yet renamed.
    done, log, save, out = _fault_run(corpus, tmp_path, "--kill-in-save", "4")
    assert done.returncode == 0, log
    assert "resumed from" in done.stdout and "step_000002 at step 2" in done.stdout, log
    restarted = {int(k): v for k, v in json.loads((out / "losses_attempt1.json").read_text()).items()}
    expected = two_ranks["uninterrupted"]["losses"]
    assert restarted == {step: expected[step] for step in (3, 4, 5, 6)}
    assert sorted(p.name for p in save.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]
    # The killed save's temporary folder was never taken for a checkpoint, and a later save cleared it.
    assert sorted(p.name for p in save.iterdir()) == ["latest", "step_000002", "step_000004", "step_000006"]


# ---- the command line ---------------------------------------------------------------------------

def test_cli_run_writes_tensorboard_checkpoint_and_trace(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, save = tmp_path / "tb", tmp_path / "ckpt"
    sets = ["model.num_layers=2", "model.hidden_size=64", "model.max_text_positions=64",
            f"model.vocab_size={corpus.vocab_size}", "train.micro_batch=2", "train.global_batch=4",
            "train.peak_tflops=1", "train.eval_iters=1"]
    command = [sys.executable, str(ROOT / "examples" / "pretrain_m6.py"),
               "--config", str(ROOT / "examples" / "configs" / "tiny.yaml"), "--tp", "1", "--pp", "1",
               "--data", corpus.train, "--eval-data", corpus.heldout, "--vocab-file", corpus.vocab_file,
               "--train-steps", "3", "--log-interval", "1", "--eval-interval", "3", "--save", str(save),
               "--save-interval", "0", "--tensorboard-dir", str(tb), "--profile-steps", "2:3"]
    for item in sets:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step ") >= 3 and "eval at step 3" in done.stdout

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/loss_scale", "train/grad_norm", "train/skipped_steps",
                "train/tokens_per_s", "train/tflops_per_device", "train/mfu", "train/peak_memory_gib",
                "eval/loss"):
        assert tag in tags, sorted(tags)
    # Per-task losses: whichever tasks the 12 samples of the run drew (the mix is seeded).
    assert any(tag.startswith("train/loss/") for tag in tags), sorted(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]

    assert (save / "latest").read_text().strip() == "step_000003"
    assert (save / "step_000003" / "complete").is_file()

    traces = list(tb.glob("*.pt.trace.json*"))
    assert len(traces) == 1, sorted(p.name for p in tb.iterdir())
    opener = gzip.open if traces[0].suffix == ".gz" else open
    with opener(traces[0], "rt", encoding="utf-8") as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    profiled = sorted(n for n in names if n.startswith("ProfilerStep#"))
    # Steps are counted from 1 and the profiler's from 0: "2:3" records step 2 only.
    assert profiled == ["ProfilerStep#1"], profiled
