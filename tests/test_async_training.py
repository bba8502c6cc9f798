"""The trainer with asynchronous checkpoints (``train.async_save``) at (tp, pp, dp) = (1, 2, 1),
dropout 0.1, a checkpoint every 2 of 6 steps (tests/training_job.py's ``fault_job``).

- Same training: the losses with background saves are those with synchronous saves, bit for bit,
  and every checkpoint holds the same tensors and objects (read whole with DCP's
  ``dcp_to_torch_save``).
- Kill safety: the whole job SIGKILLed while rank 0's writer is in the middle of step 4's shard,
  or while it publishes step 4 (shards and manifest written), leaves step 2 the checkpoint a resume
  finds; the next run resumes from it, its losses those of the uninterrupted run bit for bit, and
  its saves clear what the killed one left.
- Errors: a background write failing on one rank (no space left, injected) is a CheckpointError
  naming the step and folder on every rank, raised by the next save (step 4's, at step 6) or at the
  end of the run (step 6's), with the earlier checkpoints loadable.
- The command line's ``--async-save`` sets the field.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m6_engine.checkpoint import CheckpointError, latest_checkpoint
from tests.distributed import free_port, run_ranks
from tests.training_job import Corpus, Run, check_resumed, fault_job, launch
from tests.training_job import corpus_fixture  # noqa: F401  (provides the module-scoped "corpus" fixture)

ROOT = Path(__file__).resolve().parents[1]
SAVED = ("step_000002", "step_000004", "step_000006")


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The fault job run through with synchronous and with background saves."""
    sync, background = tmp_path_factory.mktemp("sync"), tmp_path_factory.mktemp("async")
    runs = {"sync": Run(fault_job(corpus, save_dir=str(sync), save_interval=2)),
            "async": Run(fault_job(corpus, save_dir=str(background), save_interval=2, async_save=True))}
    return launch(2, runs) | {"dirs": {"sync": sync, "async": background}}


def _whole(folder: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def _assert_same(a, b, where: str):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(set(a) ^ set(b)))
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


def test_background_saves_train_and_store_exactly_as_synchronous_ones(uninterrupted, tmp_path):
    assert sorted(uninterrupted["sync"]["losses"]) == list(range(1, 7))
    assert uninterrupted["async"]["losses"] == uninterrupted["sync"]["losses"]
    dirs = uninterrupted["dirs"]
    for kind in ("sync", "async"):
        assert sorted(p.name for p in dirs[kind].iterdir()) == ["latest", *SAVED]
    for name in SAVED:
        sync = _whole(dirs["sync"] / name, tmp_path / f"sync-{name}.pt")
        background = _whole(dirs["async"] / name, tmp_path / f"async-{name}.pt")
        assert any(k.startswith("optimizer.") for k in sync) and "extra" in sync
        _assert_same(background, sync, name)


# ---- the whole job killed in a background save -------------------------------------------------

def _start_job(corpus: Corpus, save: Path, out: Path, attempt: int, *flags) -> list[subprocess.Popen]:
    """The fault worker on 2 ranks as 2 plain processes (no agent: the test kills them itself)."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": str(attempt)}
    command = [sys.executable, str(ROOT / "tests" / "training_job.py"), "--data", str(corpus.folder),
               "--save", str(save), "--out", str(out), "--async-save", *flags]
    procs = []
    for rank in range(2):
        with open(out / f"attempt{attempt}_rank{rank}.log", "w") as log:   # the child keeps its copy
            procs.append(subprocess.Popen(command, cwd=ROOT, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))


def _kill_when_hung(procs: list[subprocess.Popen], out: Path, timeout_s: float = 240.0) -> None:
    """SIGKILL every rank once rank 0 announces it hangs in the save (OUT/hung_rank0)."""
    deadline = time.monotonic() + timeout_s
    try:
        while not (out / "hung_rank0").exists():
            exited = [p.returncode for p in procs if p.poll() is not None]
            assert not exited, f"a rank exited ({exited}) before the save hung:\n{_logs(out)}"
            assert time.monotonic() < deadline, f"the save never hung:\n{_logs(out)}"
            time.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()


def _killed_then_resumed(corpus, tmp_path, hang: str) -> tuple[Path, Path, list[str], dict]:
    """Kill the job hung in step 4's save, then resume it; (save, out, what the kill left in
    save, {file name: bytes} of the killed save's folder)."""
    save, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    _kill_when_hung(_start_job(corpus, save, out, 0, hang, "4"), out)
    (tmp_folder,) = save.glob(".tmp-step_000004-*")
    left = [p.name if p != tmp_folder else ".tmp-step_000004-*" for p in sorted(save.iterdir())]
    killed_save = {p.name: p.stat().st_size for p in tmp_folder.iterdir()}
    assert latest_checkpoint(save) == save / "step_000002", left
    resumed = _start_job(corpus, save, out, 1)
    codes = [p.wait(timeout=240) for p in resumed]
    assert codes == [0, 0], _logs(out)
    return save, out, left, killed_save


def _check_resumed_run(save: Path, out: Path, uninterrupted, record_property) -> None:
    logs = _logs(out)
    assert f"resumed from {save / 'step_000002'} at step 2" in logs, logs
    losses = {int(k): v for k, v in json.loads((out / "losses_attempt1.json").read_text()).items()}
    check_resumed("killed in a background save", losses, uninterrupted["async"]["losses"], 2,
                  record_property, tolerance=0.0)
    # The resumed run's saves published steps 4 and 6 and removed the killed save's folder.
    assert sorted(p.name for p in save.iterdir()) == ["latest", *SAVED]


def test_job_killed_mid_write_resumes_from_the_previous_checkpoint(corpus, uninterrupted, tmp_path,
                                                                     record_property):
    save, out, left, killed_save = _killed_then_resumed(corpus, tmp_path, "--hang-in-write")
    assert left == [".tmp-step_000004-*", "latest", "step_000002"], left
    assert any(size > 0 for name, size in killed_save.items() if name.endswith(".distcp")), killed_save
    assert "complete" not in killed_save and ".metadata" not in killed_save, killed_save   # mid-write
    _check_resumed_run(save, out, uninterrupted, record_property)


def test_job_killed_while_publishing_resumes_from_the_previous_checkpoint(corpus, uninterrupted, tmp_path,
                                                                          record_property):
    save, out, left, killed_save = _killed_then_resumed(corpus, tmp_path, "--hang-in-publish")
    assert left == [".tmp-step_000004-*", "latest", "step_000002"], left
    assert {"complete", ".metadata"} <= set(killed_save), killed_save   # in the finish step
    _check_resumed_run(save, out, uninterrupted, record_property)


# ---- a failing background write -----------------------------------------------------------------

def _runs_with_failing_writes(corpus_folder, root):
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state
    from tests.test_async_checkpoint import _no_space_on_rank1

    results = {}
    for fail_at in (4, 6):
        save = os.path.join(root, f"fail{fail_at}")
        job = fault_job(Corpus(Path(corpus_folder)), save_dir=save, save_interval=2, async_save=True)
        state = init_state(job.parallel.tp, job.parallel.pp)
        train_data, _ = make_datasets(job, state)
        trainer = Trainer(job, state, train_data)
        undo = _no_space_on_rank1(fail_at)
        try:
            trainer.run()
            error = None
        except CheckpointError as failure:
            error = str(failure)
        finally:
            undo()
        results[fail_at] = {"error": error, "step": trainer.step, "latest": str(latest_checkpoint(save))}
    return results


def test_a_failed_background_write_stops_the_run_on_every_rank(corpus, tmp_path):
    for rank_result in run_ranks(_runs_with_failing_writes, 2, str(corpus.folder), str(tmp_path)):
        for fail_at, last_good in ((4, 2), (6, 4)):
            out = rank_result[fail_at]
            message = out["error"]
            assert message is not None, out
            assert f"of step {fail_at}" in message and f".tmp-step_00000{fail_at}-" in message, message
            assert "No space left on device (injected)" in message, message
            assert out["step"] == 6        # raised by step 6's save, or by the end of the run
            assert out["latest"] == str(tmp_path / f"fail{fail_at}" / f"step_00000{last_good}"), out


def test_async_save_flag(tmp_path):
    import importlib.util

    from m6_engine.config import job_config_from_dict, load_yaml

    spec = importlib.util.spec_from_file_location("pretrain_m6", ROOT / "examples" / "pretrain_m6.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = str(ROOT / "examples" / "configs" / "tiny.yaml")
    for value, expected in (("true", True), ("false", False)):
        overrides = module.overrides_of(module.parse_args(["--config", config, "--async-save", value]))
        assert job_config_from_dict(load_yaml(config), overrides).train.async_save is expected
    assert job_config_from_dict(load_yaml(config)).train.async_save is False   # the default: synchronous
