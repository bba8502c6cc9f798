"""Launch mismatches and the training CLI's handling of user errors: a layout or batch that does not
fit the world size is a ConfigError before any process group; ``examples/pretrain_m6.py`` prints a
user error as one ``error: ...`` line, once per job (RANK 0 before the process groups exist, the
first rank to meet it afterwards), and exits 2, while a programming error keeps its traceback."""

import datetime
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from m6_engine.config import ConfigError
from m6_engine.training import check_job
from tests.distributed import free_port
from tests.training_job import build_corpus, small_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("parallel, train, world, message", [
    ({"tp": 2}, {}, 3, "world size 3 is not divisible by tp * pp = 2 * 1"),
    ({"tp": 2, "pp": 2}, {}, 2, "world size 2 is not divisible by tp * pp = 2 * 2"),
    ({}, {"micro_batch": 2, "global_batch": 8}, 3,
     "TrainConfig.global_batch = 8 is not divisible by micro_batch * dp = 2 * 3 = 6"),
    ({"pp": 2}, {"micro_batch": 4, "global_batch": 12}, 4,
     "TrainConfig.global_batch = 12 is not divisible by micro_batch * dp = 4 * 2 = 8"),
    ({"pp": 3}, {}, 3, "ModelConfig.num_layers = 2 is fewer than pp = 3 pipeline stages"),
    ({"tp": 8}, {}, 8, "ModelConfig.num_heads = 4 is not divisible by tp = 8"),
])
def test_layout_mismatch_is_refused_before_any_rank_starts(corpus, parallel, train, world, message):
    job = small_job(corpus, **parallel, train=train)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_job(job, world)


def test_micro_batch_not_dividing_global_batch():
    from m6_engine.config import job_config_from_dict

    with pytest.raises(ConfigError, match=re.escape(
            "TrainConfig.global_batch = 10 is not divisible by TrainConfig.micro_batch = 4")):
        job_config_from_dict({"train": {"micro_batch": 4, "global_batch": 10}})


def _pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_m6", ROOT / "examples" / "pretrain_m6.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_programming_error_keeps_its_traceback(monkeypatch):
    module = _pretrain()

    def broken(argv=None):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(module, "main", broken)
    with pytest.raises(KeyError, match="a bug"):
        module.cli([])


def test_user_error_in_process_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    code = _pretrain().cli(["--config", str(ROOT / "examples" / "configs" / "tiny.yaml"), "--tp", "two"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: parallel.tp: ParallelConfig.tp expects int, got 'two'\n", err


def _report_from_rank(rank: int, port: int, answers) -> None:
    """Child process: rank `rank` of a job whose store is at 127.0.0.1:port asks who reports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      TORCHELASTIC_RUN_ID="test-run")
    answers.put((rank, _pretrain().first_to_report(timeout_s=20.0)))


def test_an_error_every_rank_meets_after_the_groups_exist_is_reported_by_one_rank():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # noqa: F841 (kept alive)
                          timeout=datetime.timedelta(seconds=30))
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    ranks = [context.Process(target=_report_from_rank, args=(rank, port, answers)) for rank in range(4)]
    for process in ranks:
        process.start()
    reports = dict(answers.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    assert sorted(reports) == [0, 1, 2, 3] and sum(reports.values()) == 1, reports
    assert store.add("m6/user_error/test-run/0", 0) == 4  # each rank counted once


@pytest.mark.parametrize("rank, reports", [("0", True), ("1", False)])
def test_without_a_reachable_store_rank0_reports(monkeypatch, rank, reports):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
    monkeypatch.setenv("RANK", rank)
    assert _pretrain().first_to_report(timeout_s=0.5) is reports


@pytest.mark.parametrize("report_here", [True, False])
def test_user_error_in_a_running_job_is_printed_where_decided(capsys, monkeypatch, report_here):
    module = _pretrain()
    monkeypatch.setenv("RANK", "1")

    def fails_in_job(argv=None):
        raise module.UserErrorInJob(ConfigError("data.corpus: no such file"), report_here)

    monkeypatch.setattr(module, "main", fails_in_job)
    assert module.cli([]) == 2
    assert capsys.readouterr().err == ("error: data.corpus: no such file\n" if report_here else "")


def _torchrun(nproc: int, *args: str):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               str(ROOT / "examples" / "pretrain_m6.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "M6_THREADS_PER_RANK": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _no_worker_traceback(stderr: str):
    """No frame of the workers' code: torchrun's launcher still prints its own ChildFailedError
    traceback and failure block for any worker exiting non-zero, which the workers cannot change."""
    assert not re.search(r'File ".*(pretrain_m6\.py|m6_engine/)', stderr), stderr[-3000:]
    assert stderr.count("Traceback (most recent call last)") <= 1, stderr[-3000:]


def test_config_error_under_torchrun_is_printed_once_by_rank0(tmp_path):
    done = _torchrun(2, "--config", str(ROOT / "examples" / "configs" / "tiny.yaml"), "--tp", "two")
    errors = [line for line in done.stderr.splitlines() if "error: " in line and "ParallelConfig.tp" in line]
    assert done.returncode != 0, done.stderr[-3000:]
    assert errors == ["error: parallel.tp: ParallelConfig.tp expects int, got 'two'"], done.stderr[-3000:]
    _no_worker_traceback(done.stderr)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_missing_load_path_is_one_line_from_rank0_only(corpus, tmp_path, capsys, monkeypatch, rank):
    """Caught by check_inputs before the process groups: each rank exits 2, RANK 0 alone prints."""
    import yaml

    monkeypatch.setenv("RANK", rank)
    missing = str(tmp_path / "no_such_checkpoint")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(small_job(corpus).to_dict()), encoding="utf-8")
    assert _pretrain().cli(["--config", str(config), "--load", missing]) == 2
    err = capsys.readouterr().err
    expected = (f"error: train.load = {missing!r} does not exist: give a checkpoint folder, "
                f"a directory of checkpoints or auto\n")
    assert err == (expected if rank == "0" else ""), err


def test_error_every_rank_meets_after_the_groups_exist_is_one_line_under_torchrun(corpus, tmp_path):
    """A checkpoint damaged after its save: every rank's load fails once the process groups are up
    (check_inputs only sees that the path exists); the job prints one error line, not one a rank."""
    import yaml

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(small_job(corpus, steps=1).to_dict()), encoding="utf-8")
    saved = _torchrun(2, "--config", str(config), "--set", f"train.save_dir={tmp_path / 'run'}")
    assert saved.returncode == 0, saved.stderr[-3000:]
    checkpoint = tmp_path / "run" / "step_000001"
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    done = _torchrun(2, "--config", str(config), "--load", str(checkpoint))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0, done.stderr[-3000:]
    assert len(errors) == 1 and "is damaged" in errors[0] and "train.load" in errors[0], done.stderr[-3000:]
    _no_worker_traceback(done.stderr)
