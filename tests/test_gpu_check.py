"""`make gpu-check` between GPU runs: its dry run on the CPU (the whole script, small sizes), and
the rules that decide its verdict (a failed step or stage fails the check, the others still run)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu_check.sh")


def _run_script(tmp_path, *args, **env):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GPU_CHECK_OUT": str(tmp_path), "M6_PYTHON": sys.executable, **env})


def test_dry_run_runs_every_step_and_stage(tmp_path):
    done = _run_script(tmp_path, "--dry-run")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert output.rstrip().endswith("gpu-check: OK"), output[-2000:]
    with open(tmp_path / "gpu_check.json") as f:
        summary = json.load(f)
    assert [s["step"] for s in summary["steps"]] == ["build", "cuda_tests", "stages"]
    assert all(s["exit_status"] == 0 for s in summary["steps"])
    assert summary["dry_run"] and set(summary["stages"]) == set(gpu_check.STAGES)
    assert all(r["ok"] for r in summary["stages"].values())
    training = summary["stages"]["training"]
    assert training["tokens_per_s"] > 0 and training["mfu"] > 0 and training["planned_memory_gib"] > 0
    assert summary["stages"]["loss_scaler"]["skipped_steps"] == 1
    assert {k["op"] for k in summary["stages"]["kernels"]["kernels"]} == {"masked_softmax", "layer_norm"}
    (attention,) = summary["stages"]["attention"]["cases"]
    assert attention["max_abs_difference_vs_fp32_reference"] < 1e-4
    assert set(attention["fwd_bwd_ms"]) == {"prefix_lm_attention", "sdpa_mask", "sdpa_causal"}
    init = summary["stages"]["init"]
    assert all(r["max_ulps_from_cpu"] == 0 for r in init["dtypes"].values()) and init["elements_per_s"]["float32"] > 0
    assert f"python: {sys.executable}" in output   # it says which interpreter and torch it used


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real check would run")
def test_without_a_gpu_it_refuses_before_building(tmp_path):
    done = _run_script(tmp_path, PATH="/usr/bin:/bin")
    assert done.returncode == 1
    assert "no python" in done.stderr and "whose torch sees a GPU" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_bad_arguments_are_refused(tmp_path):
    done = _run_script(tmp_path, "--dryrun")
    assert done.returncode == 2 and "usage: bash tests/gpu_check.sh [--dry-run]" in done.stderr


def test_a_raising_stage_is_recorded_and_the_others_still_run(tmp_path, capsys):
    def broken(state, sizes, out):
        raise RuntimeError("kernel exploded")

    stages = {"first": broken, "second": lambda state, sizes, out: {"figure": 1.5}}
    results = gpu_check.run_stages(None, str(tmp_path), gpu_check.DRY, stages=stages)
    assert not results["first"]["ok"] and "kernel exploded" in results["first"]["error"]
    assert results["second"]["ok"] and results["second"]["figure"] == 1.5


def _write_results(folder, steps, stages):
    (folder / "gpu_check_steps.tsv").write_text("".join(f"{n}\t{rc}\t{s}\n" for n, rc, s in steps))
    if stages is not None:
        (folder / "gpu_check_stages.json").write_text(json.dumps({"stages": stages}))


def test_the_verdict_names_every_failed_step_and_stage(tmp_path, capsys):
    ok = {"ok": True, "seconds": 1.0}
    _write_results(tmp_path, [("build", 0, 5), ("cuda_tests", 1, 60), ("stages", 0, 30)],
                   {"parity": {"ok": False, "error": "...", "seconds": 2.0}, "checkpoint": ok})
    assert gpu_check.summarize(str(tmp_path)) == 1
    assert "gpu-check: FAILED: cuda_tests, stage parity" in capsys.readouterr().out
    _write_results(tmp_path, [("build", 0, 5), ("stages", 0, 30)], {"checkpoint": ok})
    assert gpu_check.summarize(str(tmp_path)) == 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]["step"] == "build"
    _write_results(tmp_path, [("build", 2, 5)], None)   # the build failed; the stages never ran
    assert gpu_check.summarize(str(tmp_path)) == 1
    assert "FAILED: build, stages (never ran)" in capsys.readouterr().out
