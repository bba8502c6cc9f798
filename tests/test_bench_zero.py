"""The ZeRO benchmark's plumbing (its quick case): both stages ran at dp 2 and 4, the stage-2
gradient buffer is 1/dp of stage 1's (bytes, exact: every bucket is a multiple of dp), the staging
peak is below one whole buffer, and the overlap figures were measured for both stages."""

import json

from tests.bench import bench_zero


def test_quick_zero_bench_measures_memory_and_overlap(tmp_path):
    result = bench_zero.run(str(tmp_path), quick=True)
    assert [m["dp"] for m in result["memory"]] == [2, 4]
    for m in result["memory"]:
        assert m["stage2_grad_bytes"] * m["dp"] == m["stage1_grad_bytes"], m
        assert 0 < m["stage2_staging_peak_bytes"] < m["stage1_grad_bytes"], m
    assert [o["zero_stage"] for o in result["overlap"]] == [1, 2]
    assert all(o["serial_comm_ms"] > 0 and o["exposed_ms"] >= 0 for o in result["overlap"])
    assert json.loads((tmp_path / "bench_zero.json").read_text())["memory"] == result["memory"]
