"""Launch mismatches and the training CLI's handling of user errors: a layout or batch that does not
fit the world size is a ConfigError before any process group; ``examples/pretrain_m6.py`` prints a
user error as one ``error: ...`` line (RANK 0 only before the process groups exist) and exits 2,
while a programming error keeps its traceback."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
