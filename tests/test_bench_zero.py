"""The ZeRO benchmark's plumbing (its quick case): both stages ran at dp 2 and 4, the stage-2
gradient buffer is 1/dp of stage 1's (bytes, exact: every bucket is a multiple of dp), the staging
peak is below one whole buffer, ZeRO-3 stores 1/dp of the parameters and gathers less than all of
them at once, and the overlap figures were measured for every stage."""

import json

from tests.bench import bench_zero


def test_quick_zero_bench_measures_memory_and_overlap(tmp_path):
    result = bench_zero.run(str(tmp_path), quick=True)
    assert [m["dp"] for m in result["memory"]] == [2, 4]
    for m in result["memory"]:
        assert m["stage2_grad_bytes"] * m["dp"] == m["stage1_grad_bytes"], m
        assert 0 < m["stage2_staging_peak_bytes"] < m["stage1_grad_bytes"], m
    for p in result["zero3_params"]:
        assert p["shard_bytes"] * p["dp"] == p["whole_bytes"], p
        assert 0 < p["gathered_peak_bytes"] < p["whole_bytes"], p
    assert [o["zero_stage"] for o in result["overlap"]] == [1, 2, 3]
    assert all(o["serial_comm_ms"] > 0 and o["exposed_ms"] >= 0 for o in result["overlap"])
    assert json.loads((tmp_path / "bench_zero.json").read_text())["memory"] == result["memory"]
