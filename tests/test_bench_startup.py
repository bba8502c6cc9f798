"""The start-up benchmark's quick case: the three builds ran and were timed, the per-shard build drew
each rank's shards only (about 1/tp of the full master weights the full-draw build drew), and the
resumed and touched builds drew nothing."""

import json

from tests.bench import bench_startup


def test_quick_startup_bench_times_the_three_builds(tmp_path):
    result = bench_startup.run(str(tmp_path), quick=True)
    builds = {b["build"]: b for b in result["builds"]}
    assert list(builds) == ["full_draw", "per_shard", "resumed", "touched"]
    assert all(b["seconds"] > 0 for b in builds.values())
    for build in ("resumed", "touched"):
        assert builds[build]["elements_drawn_per_rank"] == 0 and builds[build]["ns_per_drawn_element"] is None
    full, shard = builds["full_draw"]["elements_drawn_per_rank"], builds["per_shard"]["elements_drawn_per_rank"]
    # tp 2: the sharded matrices halve; the replicated position / segment / patch tables do not.
    assert 0.5 * full < shard < 0.65 * full, (shard, full)
    assert result["full_draw_over_per_shard"] > 0 and result["params_per_rank"] < result["model_params"]
    assert json.loads((tmp_path / "bench_startup.json").read_text())["builds"] == result["builds"]
