"""The CPU AdamW benchmark's plumbing (its quick case): every contender ran (torch's fused AdamW, or
the error it raised), the figures and ratios are in the JSON, and the contenders computed the same
update (no timing is judged)."""

import json
import math

from tests.bench import bench_cpu_adamw


def test_quick_cpu_adamw_bench_compares_equal_updates(tmp_path):
    result = bench_cpu_adamw.run(str(tmp_path), quick=True)
    assert set(result["step_s"]) | set(result["errors"]) == set(bench_cpu_adamw.CONTENDERS)
    assert {"ours", "ours_bf16_copy", "torch_foreach"} <= set(result["step_s"]), result["errors"]
    for key in ("achieved_gbps", "fraction_of_copy_bandwidth", "fraction_of_inplace_bandwidth", "bytes_per_step"):
        assert set(result[key]) == set(result["step_s"]), key
    assert result["bytes_per_step"]["ours"] == 28 * result["numel"]
    assert result["bytes_per_step"]["ours_bf16_copy"] == 30 * result["numel"]
    assert result["copy_gbps"] > 0 and result["inplace_gbps"] > 0
    assert result["torch_foreach_over_ours"] > 0 and result["ours_bf16_copy_over_ours"] > 0
    assert ("torch_fused" in result["errors"]) == (result["torch_fused_over_ours"] is None)
    assert all(math.isfinite(s) and s > 0 for s in result["step_s"].values())
    same = result["same_update"]
    assert same["max_abs_diff_vs_ours"]["ours_bf16_copy"] == 0.0
    for name, diff in same["max_abs_diff_vs_ours"].items():
        assert diff < 1e-5, (name, diff)   # torch's sqrt differs from ours by an ulp here and there
    assert same["bf16_copy_equals_param_cast"]["ours_bf16_copy"] is True
    assert json.loads((tmp_path / "bench_cpu_adamw.json").read_text())["same_update"] == same
