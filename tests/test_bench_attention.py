"""The attention benchmark's plumbing (its quick case): the contenders compute the same function
under the prefix-LM mask, and the saved-for-backward count sees the unfused path's probabilities."""

import json

from tests.bench import bench_attention


def test_quick_attention_bench_compares_equal_functions(tmp_path):
    result = bench_attention.run(str(tmp_path), quick=True)
    (case,) = result["cases"]
    assert case["unfused_vs_sdpa_mask_max_abs_difference"] < 1e-5, case
    b, h, s, _ = case["shape"]
    # unfused keeps the (B, H, S, S) fp32 probabilities for its second matmul and the softmax
    assert case["saved_for_backward_bytes"]["unfused"] >= b * h * s * s * 4, case
    assert set(case["fwd_bwd_s"]) == {"unfused", "sdpa_mask", "sdpa_causal"}
    assert json.loads((tmp_path / "bench_attention.json").read_text())["cases"][0]["case"] == case["case"]
