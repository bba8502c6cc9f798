"""The sample-index benchmark's plumbing (its quick case): the index it builds equals the reference
scan, both start-ups ran in their own process and saw the same documents (no timing is judged)."""

import json

from tests.bench import bench_sample_index


def test_quick_sample_index_bench(tmp_path):
    result = bench_sample_index.run(str(tmp_path), quick=True)
    assert result["index_equals_scan"] is True
    docs = result["documents"]
    expected = {"text": docs - docs // 4, "captions": docs // 8, "pairs": docs // 4}
    for case in ("open_with_index", "open_without_index"):
        assert result[case]["documents"] == expected, case
        assert 0 < result[case]["open_s"] <= result[case]["first_batch_s"]
    assert result["open_speedup"] > 0 and result["scan_over_build"] > 0
    assert json.loads((tmp_path / "bench_sample_index.json").read_text())["documents"] == docs
