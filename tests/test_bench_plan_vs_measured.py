"""The planner-vs-measured benchmark's quick case: every case ran on its ranks, every ratio is
finite and, since both sides are byte counts (no timing), within the 10% goal."""

import json
import math

from tests.bench import bench_plan_vs_measured


def test_quick_plan_vs_measured_bench(tmp_path):
    result = bench_plan_vs_measured.run(str(tmp_path), quick=True)
    cases = bench_plan_vs_measured.CASES
    assert [c["case"] for c in result["cases"]] == list(cases)
    for c in result["cases"]:
        assert len(c["ranks"]) == cases[c["case"]][0], c["case"]
        for r in c["ranks"]:
            assert r["measured"] > 0 and r["predicted"] > 0 and math.isfinite(r["ratio"]), (c["case"], r)
            assert abs(r["ratio"] - 1) <= result["goal"], (c["case"], r["rank"], r["ratio"])
    assert result["within_goal"]
    saved = json.loads((tmp_path / "bench_plan_vs_measured.json").read_text())
    assert [c["ratio"] for c in saved["cases"]] == [c["ratio"] for c in result["cases"]]
