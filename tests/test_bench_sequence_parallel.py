"""The sequence-parallel memory benchmark's quick case: every case ran, SP keeps less than tp
without SP, and within 5% of the whole layer's activations / tp (byte counts, not timings)."""

import json

from tests.bench import bench_sequence_parallel


def test_quick_sequence_parallel_bench_measures_saved_activations(tmp_path):
    result = bench_sequence_parallel.run(str(tmp_path), quick=True)
    assert [(c["tp"], c["recompute"]) for c in result["cases"]] == [
        (2, "none"), (2, "selective"), (4, "none"), (4, "selective")]
    for case in result["cases"]:
        assert 0 < case["sp_mib"] < case["no_sp_mib"] < case["tp1_mib"], case
        assert 0.95 <= case["sp_vs_ideal"] <= 1.05, case
    saved = json.loads((tmp_path / "bench_sequence_parallel.json").read_text())
    assert saved["cases"] == result["cases"]
