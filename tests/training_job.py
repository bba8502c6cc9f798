"""The small M6 training job of tests/test_training.py: its config, a rank function that runs a list
of jobs in one launch, and (run as a script under torchrun) the worker of the fault test.

The data is a small demo corpus (:func:`build_corpus`: ``m6_engine.data.prepare_demo`` on 24
synthetic images and 120 People's-Daily-like paragraphs) tokenised with a vocabulary of just the
characters it holds (~450 entries), so the output layer does not dominate every step. The model is
the ``tiny`` preset shrunk to 2 layers of width 64 and 64 text positions, with that vocabulary and
16 patches of 2048 features; a step is a global batch of 8 in micro-batches of 2, AdamW with 2
warm-up steps out of 10 and a cosine decay to 1e-4.

Fault worker: ``python -m torch.distributed.run --nproc_per_node=2 --max-restarts=1 ...
tests/training_job.py --data DIR --save DIR --out DIR --kill-after K`` (DIR of build_corpus) trains
:func:`fault_job` (pp = 2, dropout 0.1, a checkpoint every 2 steps, ``load=auto``); on the first
attempt (``TORCHELASTIC_RESTART_COUNT`` 0) rank 1 SIGKILLs itself after step K, or with
``--kill-in-save K`` instead rank 0 SIGKILLs itself inside step K's save, once every shard and the
manifest are written and just before the folder is published. The logging rank of each attempt
that finishes writes ``OUT/losses_attempt<N>.json``: {step: loss}.

With ``--async-save`` the job saves in the background; ``--hang-in-write K`` (rank 0's writer
stops for good with part of a shard of step K's save on disk) and ``--hang-in-publish K`` (rank 0
stops as it publishes step K's save, shards and manifest written) announce themselves in
``OUT/hung_rank0`` for a test that then SIGKILLs the whole job. These launch without torchrun as
well (the test sets RANK, WORLD_SIZE, MASTER_ADDR, ... and TORCHELASTIC_RESTART_COUNT itself).
"""

import argparse
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from m6_engine.config import JobConfig, job_config_from_dict

STEPS = 10


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What :func:`build_corpus` wrote under ``folder``."""

    folder: Path

    @property
    def train(self) -> str:
        return str(self.folder / "corpus" / "train")

    @property
    def heldout(self) -> str:
        return str(self.folder / "corpus" / "heldout")

    @property
    def vocab_file(self) -> str:
        return str(self.folder / "vocab.txt")

    @property
    def vocab_size(self) -> int:
        from m6_engine.data.tokenizer import BertWordPieceTokenizer

        return BertWordPieceTokenizer(self.vocab_file).vocab_size


def build_corpus(folder, *, num_images: int = 24, paragraphs: int = 120, vocab_file=None) -> Corpus:
    """Demo corpora (train / heldout) under ``folder``, tokenised with ``vocab_file`` or, by
    default, a vocabulary of the specials and every character of the texts."""
    from m6_engine.data import prepare_demo, synthetic
    from tests.test_indexed import write_vocab
    from tests.test_prepare_demo import _tagged_corpus

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = prepare_demo.DemoDataConfig(num_images=num_images, num_heldout_images=max(1, num_images // 6),
                                         seed=3, heldout_every=10, workers=1)
    tagged = _tagged_corpus(folder / "tagged.txt", paragraphs)
    texts = tagged.read_text(encoding="utf-8").splitlines()
    shapes = synthetic.SyntheticConfig(num_images=num_images + config.num_heldout_images, seed=config.seed,
                                       max_shapes=config.max_shapes,
                                       questions_per_image=config.questions_per_image)
    texts += [d["content"] for i in range(shapes.num_images) for d in synthetic.documents(shapes, i)[1]]
    vocab = folder / "vocab.txt"
    if vocab_file is None:
        write_vocab(vocab, texts)
    else:
        vocab.write_bytes(Path(vocab_file).read_bytes())
    prepare_demo.prepare(folder, config, tagged, vocab)
    return Corpus(folder)


@pytest.fixture(scope="module", name="corpus")
def corpus_fixture(tmp_path_factory) -> Corpus:
    """The default :func:`build_corpus`, once per test module that imports this fixture."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def small_job(corpus: Corpus, *, tp: int = 1, pp: int = 1, steps: int = STEPS, dropout: float = 0.0,
              evaluate: bool = False, model: dict | None = None, optimizer: dict | None = None,
              train: dict | None = None, timeout_s: float = 60.0) -> JobConfig:
    """The test job on ``corpus``; the dicts override fields of their section. ``evaluate``: with
    the held-out corpus (one global batch per evaluation; :func:`run_jobs` evaluates at the end)."""
    return job_config_from_dict({
        "model": {"preset": "tiny", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "max_text_positions": 64, "vocab_size": corpus.vocab_size,
                  "hidden_dropout": dropout, "attention_dropout": dropout, **(model or {})},
        "parallel": {"tp": tp, "pp": pp, "timeout_s": timeout_s},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.2, "weight_decay": 0.01,
                      "clip_grad": 1.0, **(optimizer or {})},
        # peak_tflops given: the CPU's matmul peak is not measured at every Trainer start.
        "train": {"train_steps": steps, "micro_batch": 2, "global_batch": 8, "log_interval": 1,
                  "eval_iters": 1, "peak_tflops": 1.0, **(train or {})},
        "data": {"corpus": corpus.train, "eval_corpus": corpus.heldout if evaluate else "",
                 "vocab_file": corpus.vocab_file, "exhausted": "wrap"},
    })


def fault_job(corpus: Corpus, *, save_dir: str = "", save_interval: int = 0, load: str = "",
              async_save: bool = False) -> JobConfig:
    """The job of the resume and fault tests: pp = 2, dropout 0.1, 6 steps."""
    return small_job(corpus, pp=2, steps=6, dropout=0.1,
                     train={"save_dir": save_dir, "save_interval": save_interval, "load": load,
                            "async_save": async_save})


class StopRun(Exception):
    """Raised by a step callback to end a run early (as a job that is stopped would)."""


def _stop_after(step: int):
    def callback(trainer):
        if trainer.step == step:
            raise StopRun

    return callback


@dataclasses.dataclass(frozen=True)
class Run:
    """One Trainer run of a launch: its job, and the step after which it stops (0: run to the end)."""

    job: JobConfig
    stop_after: int = 0


def run_jobs(runs: list[Run]) -> list[dict | None]:
    """Rank function: each run in turn, on a fresh ParallelState of its (tp, pp) over all ranks.

    Returns per run, on the logging rank, {"losses": {step: loss}, "history", "param_dtype",
    "optimizer_bytes_per_param" (this rank's), "eval" (``Trainer.evaluate()`` after the run, when
    the job has a held-out corpus)}; None on the other ranks.
    """
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state

    results = []
    for run in runs:
        state = init_state(run.job.parallel.tp, run.job.parallel.pp)
        train_data, eval_factory = make_datasets(run.job, state)
        trainer = Trainer(run.job, state, train_data, eval_data_factory=eval_factory)
        if run.stop_after:
            trainer.step_callbacks.append(_stop_after(run.stop_after))
        try:
            trainer.run()
        except StopRun:
            trainer.log.close()
        evaluation = trainer.evaluate() if eval_factory is not None else None
        results.append({"losses": {h["step"]: h["loss"] for h in trainer.history},
                        "history": trainer.history, "param_dtype": str(trainer.stage.dtype),
                        "optimizer_bytes_per_param": trainer.optimizer.state_bytes()
                        / sum(p.numel() for p in trainer.stage.parameters()),
                        "host_copies": trainer.optimizer.host_copies,
                        "eval": evaluation} if trainer.logs_here else None)
    return results


def launch(world: int, runs: dict, timeout_s: float = 300.0) -> dict:
    """Run the named ``runs`` (name -> :class:`Run`) with :func:`run_jobs` on ``world`` ranks;
    per name, the logging rank's result (exactly one rank logs)."""
    from tests.distributed import run_ranks

    results = run_ranks(run_jobs, world, list(runs.values()), timeout_s=timeout_s)
    merged = {}
    for i, name in enumerate(runs):
        logged = [r[i] for r in results if r[i] is not None]
        assert len(logged) == 1, f"{name}: {len(logged)} ranks logged"
        merged[name] = logged[0]
    return merged


def max_rel(a: dict, b: dict) -> float:
    """The largest relative difference of ``a`` to ``b`` over their (equal) keys, e.g. losses by step."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def check_resumed(name: str, resumed: dict, source: dict, save_at: int, record_property,
                  tolerance: float = 1e-5) -> float:
    """A run resumed from step ``save_at``'s checkpoint continues with ``source``'s losses: the
    largest relative difference over the steps after it (recorded, printed), at most ``tolerance``."""
    expected = {step: source[step] for step in range(save_at + 1, max(source) + 1)}
    rel = max_rel(resumed, expected)
    record_property("max_rel_loss_diff", rel)
    print(f"{name} from step {save_at}: max relative loss difference: {rel:.2e}")
    assert rel <= tolerance, (resumed, expected)
    return rel


def _kill_rank_after(step: int, rank: int):
    def callback(trainer):
        if trainer.step == step and trainer.state.rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def _kill_rank0_in_save(step: int) -> None:
    """Make this process SIGKILL itself when it publishes the checkpoint of ``step`` (rank 0 does)."""
    from m6_engine.checkpoint import save as save_module
    from m6_engine.checkpoint.folders import step_dirname

    publish = save_module.publish

    def publish_or_die(tmp, final):
        if Path(final).name == step_dirname(step):
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final)

    save_module.publish = publish_or_die


def _announce_and_hang(out: str) -> None:
    """Write OUT/hung_rank<r> (this rank's pid), then block this thread until the process is killed."""
    path = os.path.join(out, f"hung_rank{os.environ['RANK']}")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(3600)   # the test SIGKILLs the job once it sees the file


def _hang_in_write(step: int, out: str) -> None:
    """Make this process's checkpoint writer hang inside the save of ``step``, with part of a shard
    written to its file (flushed), after announcing it (:func:`_announce_and_hang`)."""
    from m6_engine.checkpoint import digests
    from m6_engine.checkpoint.folders import step_dirname

    write, folder = digests.DigestingStream.write, f".tmp-{step_dirname(step)}-"

    def write_then_hang(self, data):
        written = write(self, data)
        name = self._raw.name
        if folder in name and name.endswith(".distcp"):
            self.flush()
            _announce_and_hang(out)
        return written

    digests.DigestingStream.write = write_then_hang


def _hang_in_publish(step: int, out: str) -> None:
    """Make this process hang when it publishes the checkpoint of ``step`` (rank 0 does), its
    shards and manifest written, the folder not yet renamed."""
    from m6_engine.checkpoint import save as save_module
    from m6_engine.checkpoint.folders import step_dirname

    publish = save_module.publish

    def hang_then_publish(tmp, final):
        if Path(final).name == step_dirname(step):
            _announce_and_hang(out)
        publish(tmp, final)

    save_module.publish = hang_then_publish


def main(argv=None) -> None:
    """The fault worker (module docstring)."""
    import torch.distributed as dist

    from m6_engine.parallel import initialize
    from m6_engine.training import Trainer, make_datasets

    parser = argparse.ArgumentParser(description="fault-test worker (run under torchrun)")
    parser.add_argument("--data", required=True, help="folder of build_corpus")
    parser.add_argument("--save", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--async-save", action="store_true", help="train.async_save")
    kill = parser.add_mutually_exclusive_group()
    kill.add_argument("--kill-after", type=int, help="attempt 0: rank 1 dies after this step")
    kill.add_argument("--kill-in-save", type=int, help="attempt 0: rank 0 dies publishing this step's save")
    kill.add_argument("--hang-in-write", type=int, help="attempt 0: rank 0's writer hangs in this step's save")
    kill.add_argument("--hang-in-publish", type=int, help="attempt 0: rank 0 hangs publishing this step's save")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # as the test harness's ranks: the reference run is computed there
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    job = fault_job(Corpus(Path(args.data)), save_dir=args.save, save_interval=2, load="auto",
                    async_save=args.async_save)
    state = initialize(job.parallel.tp, job.parallel.pp, backend="gloo", timeout=job.parallel.timeout_s)
    train_data, _ = make_datasets(job, state)
    trainer = Trainer(job, state, train_data)
    if attempt == 0 and args.kill_after is not None:
        trainer.step_callbacks.append(_kill_rank_after(args.kill_after, rank=1))
    if attempt == 0 and args.kill_in_save is not None and state.rank == 0:
        _kill_rank0_in_save(args.kill_in_save)
    if attempt == 0 and args.hang_in_write is not None and state.rank == 0:
        _hang_in_write(args.hang_in_write, args.out)
    if attempt == 0 and args.hang_in_publish is not None and state.rank == 0:
        _hang_in_publish(args.hang_in_publish, args.out)
    trainer.run()
    if trainer.logs_here:
        path = os.path.join(args.out, f"losses_attempt{attempt}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({h["step"]: h["loss"] for h in trainer.history}, f)
        os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
