"""The attention benchmark's plumbing (its quick case): the contenders compute the same function
under the prefix-LM mask, the saved-for-backward count sees the unfused path's probabilities and
not the fused op's, and the layer step ran both backends."""

import json

from tests.bench import bench_attention


def test_quick_attention_bench_compares_equal_functions(tmp_path):
    result = bench_attention.run(str(tmp_path), quick=True)
    (case,) = result["cases"]
    assert case["unfused_vs_sdpa_mask_max_abs_difference"] < 1e-5, case
    assert case["fused_vs_unfused_max_abs_difference"] < 1e-5, case
    b, h, s, d = case["shape"]
    saved = case["saved_for_backward_bytes"]
    # unfused keeps the (B, H, S, S) fp32 probabilities for its second matmul and the softmax;
    # fused keeps q, k, v, out (B, H, S, D) and the (B, H, S) log-sum-exp, nothing S x S.
    assert saved["unfused"] >= b * h * s * s * 4, case
    assert saved["fused"] <= 4 * b * h * s * d * 4 + b * h * s * 4 + 3 * b * 8, case
    assert set(case["fwd_bwd_s"]) == set(bench_attention.CONTENDERS)
    assert set(case["fwd_bwd_peak_bytes"]) == set(bench_attention.CONTENDERS)
    assert set(result["layer_step"]["step_s"]) == {"fused", "unfused"}
    assert json.loads((tmp_path / "bench_attention.json").read_text())["cases"][0]["case"] == case["case"]
