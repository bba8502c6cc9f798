"""The 10B recipe a user launches: the configs follow the paper's appendix A, the launcher picks the
cluster and task variant and refuses a torch without kernels for the GPU, and the SLURM script runs
one launcher per node with the allocation's rendezvous."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from m6_engine.config import job_config_from_dict, load_yaml
from m6_engine.gpu_support import check_visible_gpus, unsupported_reason

ROOT = Path(__file__).resolve().parents[1]
CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CUDA126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def _job(name):
    return job_config_from_dict(load_yaml(str(ROOT / "examples/configs" / name)))


@pytest.mark.parametrize("name, world, steps, text", [
    ("m6-large-96xV100.yaml", 96, 8000, False), ("m6-large-8xH200.yaml", 64, 8000, False),
    ("m6-large-text-96xV100.yaml", 96, 4500, True), ("m6-large-text-8xH200.yaml", 64, 4500, True)])
def test_m6_large_configs_follow_the_paper(name, world, steps, text):
    job = _job(name)
    dp = world // (job.parallel.tp * job.parallel.pp)
    assert job.train.global_batch == 6144 and job.train.num_microbatches(dp) == 8
    assert job.train.train_steps == steps
    opt = job.optimizer
    assert (opt.lr, opt.warmup_fraction, opt.betas, opt.eps) == (1.5e-4, 0.01, (0.9, 0.999), 1e-8)
    assert job.train.save_interval > 0 and job.train.keep_last > 0 and job.train.eval_interval > 0
    assert job.train.load == "auto"
    assert job.train.async_save   # the training loop does not wait for the whole write
    weights = job.data.task_weights
    text_tasks = weights["text_denoising"] > 0 and weights["language_modelling"] > 0
    image_tasks = weights["image_to_text"] > 0 and weights["multimodal_to_text"] > 0
    assert (text_tasks, image_tasks) == (text, not text), weights


def test_text_variants_share_their_multimodal_layout():
    for cluster in ("96xV100", "8xH200"):
        text, multimodal = _job(f"m6-large-text-{cluster}.yaml"), _job(f"m6-large-{cluster}.yaml")
        assert (text.parallel, text.optimizer, text.model) == (multimodal.parallel, multimodal.optimizer,
                                                                multimodal.model)


def test_m6_base_config_follows_the_paper():
    job = _job("m6-base.yaml")
    assert job.train.global_batch == 1024 and job.train.train_steps == 320000
    assert job.optimizer.lr == 1.5e-4 and job.optimizer.warmup_fraction == 0.01
    assert job.train.save_interval and job.train.eval_interval and job.train.keep_last


def test_a_v100_with_a_cuda13_torch_is_refused_with_the_fix():
    reason = unsupported_reason("Tesla V100-SXM2-32GB", (7, 0), CUDA13_ARCHS, "2.14.1", "13.0")
    assert "no kernels for Tesla V100-SXM2-32GB (sm_70)" in reason
    assert "whl/cu126" in reason and "TORCH_CUDA_ARCH_LIST=7.0" in reason
    assert unsupported_reason("Tesla V100-SXM2-32GB", (7, 0), CUDA126_ARCHS, "2.11.0", "12.6") is None


@pytest.mark.parametrize("capability, archs", [((9, 0), CUDA13_ARCHS), ((12, 1), ["sm_90", "compute_120"]),
                                               ((8, 0), CUDA126_ARCHS)])
def test_covered_gpus_pass(capability, archs):
    assert unsupported_reason("GPU", capability, archs, "2.14.1", "13.0") is None


def test_a_new_gpu_without_kernels_names_what_to_install():
    reason = unsupported_reason("Future GPU", (13, 0), ["sm_90", "sm_120"], "2.14.1", "13.0")
    assert "sm_130" in reason and "get_arch_list() lists sm_130" in reason


def test_no_visible_gpu_is_an_error_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    (reason,) = check_visible_gpus()
    assert "no CUDA GPU is visible" in reason


def _fake_bin(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _launch(tmp_path, gpu_name: str, script="examples/pretrain_m6_large.sh", **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_bin(bin_dir, "nvidia-smi", f"echo '{gpu_name}'\n")
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PRINT_ONLY": "1", "DATA": "corpus/train",
            "MASTER_ADDR": "node0", **env}
    full.pop("CLUSTER", None) if "CLUSTER" not in env else None
    return subprocess.run(["bash", str(ROOT / script)], env=full, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("gpu, env, config, nnodes", [
    ("NVIDIA H200", {}, "m6-large-8xH200.yaml", 8),
    ("Tesla V100-SXM2-32GB", {}, "m6-large-96xV100.yaml", 12),
    ("Tesla V100-SXM2-32GB", {"CLUSTER": "8xH200", "TASKS": "text"}, "m6-large-text-8xH200.yaml", 8),
    ("NVIDIA H200", {"TASKS": "text", "NNODES": "2", "EVAL_DATA": "corpus/heldout"}, "m6-large-text-8xH200.yaml", 2),
])
def test_the_launcher_picks_cluster_and_tasks(tmp_path, gpu, env, config, nnodes):
    done = _launch(tmp_path, gpu, **env)
    assert done.returncode == 0, done.stderr
    command = done.stdout
    assert f"--config examples/configs/{config}" in command and f"--nnodes={nnodes}" in command
    assert "--rdzv-endpoint=node0:29500" in command and "--load auto" in command
    assert ("--eval-data corpus/heldout" in command) == ("EVAL_DATA" in env)
    assert (ROOT / "examples/configs" / config).exists()


def test_the_launcher_refuses_unknown_choices(tmp_path):
    done = _launch(tmp_path, "NVIDIA H200", CLUSTER="4xA100")
    assert done.returncode == 2 and "CLUSTER must be 8xH200 or 96xV100" in done.stderr
    done = _launch(tmp_path, "NVIDIA H200", TASKS="vision")
    assert done.returncode == 2 and "TASKS must be multimodal or text" in done.stderr


def test_the_slurm_script_runs_one_launcher_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "scontrol", "echo gpu-node-07; echo gpu-node-08\n")
    # srun: run the task once per node, as SLURM would, with each node's SLURM_NODEID.
    _fake_bin(bin_dir, "srun", 'shift 2; for id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    done = _launch(tmp_path, "NVIDIA H200", script="examples/pretrain_m6_large.sbatch", MASTER_ADDR="",
                   SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_JOB_NUM_NODES="2",
                   SLURM_SUBMIT_DIR=str(ROOT))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert f"--nnodes=2" in line and f"--node_rank={rank}" in line
        assert "--rdzv-endpoint=gpu-node-07:29500" in line
