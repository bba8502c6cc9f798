"""The asynchronous-checkpoint benchmark's plumbing (its quick case): both modes saved the same
stage (the same bytes up to DCP's metadata, at least 16 per parameter: the weight and the
optimizer's master and two moments), the host snapshot holds all of it, every figure was
measured, and the JSON holds what ``run`` returned. Speed is the benchmark's to report, not
judged here."""

import json

from tests.bench import bench_async_checkpoint


def test_quick_async_checkpoint_bench_measures_both_modes(tmp_path):
    result = bench_async_checkpoint.run(str(tmp_path), quick=True)
    params = result["params"]
    assert result["requested_params"] == bench_async_checkpoint.QUICK_PARAMS and not result["capped_by_memory"]
    assert abs(result["bytes"]["sync"] - result["bytes"]["async"]) < 4096, result["bytes"]
    assert result["bytes"]["sync"] >= 16 * params and result["staging_bytes"] >= 16 * params, result
    assert len(result["rounds"]) == bench_async_checkpoint.ROUNDS
    for row in result["rounds"]:
        for figure in ("sync_stall_s", "async_stall_s", "async_write_s", "async_publish_s", "step_s",
                       "step_during_write_s"):
            assert row[figure] > 0, (figure, row)
        assert row["async_publish_s"] >= row["async_stall_s"]
    assert result["stall_ratio"] > 0 and result["write_gbps"]["sync"] > 0
    written = json.loads((tmp_path / "bench_async_checkpoint.json").read_text())
    assert written["rounds"] == result["rounds"] and written["params"] == params
