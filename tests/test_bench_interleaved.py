"""The interleaved-1F1B bubble benchmark's plumbing (its quick case): plain and interleaved 1F1B
run on pp = 2 CPU ranks, every rank reports a bubble share of its step, and the formula the
figures are compared with is (pp - 1) / (V m + pp - 1)."""

import json

from tests.bench import bench_interleaved


def test_quick_interleaved_bench_reports_bubbles_and_formula(tmp_path):
    result = bench_interleaved.run(str(tmp_path), quick=True)
    rows = {(r["pp"], r["virtual_stages"]): r for r in result["layouts"]}
    assert set(rows) == {(2, 1), (2, 2)}
    for (pp, v), row in rows.items():
        assert len(row["bubble_fraction_per_rank"]) == pp
        assert all(0.0 <= b < 1.0 for b in row["bubble_fraction_per_rank"]), row
        assert row["formula_bubble_fraction"] == (pp - 1) / (v * row["microbatches"] + pp - 1)
        assert row["step_s"] > 0
    assert rows[(2, 1)]["step_over_plain"] == 1.0
    saved = json.loads((tmp_path / "bench_interleaved.json").read_text())
    assert [r["virtual_stages"] for r in saved["layouts"]] == [1, 2]
