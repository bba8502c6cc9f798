"""m6::prefix_lm_attention on the CPU against the plain reference: values, gradients, layouts,
dropout bits and reproducibility, the torch.library contract (opcheck, gradcheck), and errors."""

import os
import subprocess
import sys

import pytest
import torch

import m6_engine.ops as ops
from m6_engine.ops.attention import prefix_lm_attention
from m6_engine.ops.reference import prefix_lm_attention_reference
from tests.attention_rng import keep_mask

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="m6_engine._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(b, h, sq, sk, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, h, sk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, h, sk, d, generator=gen).to(dtype).requires_grad_()
    return q, k, v


def _lengths(*values):
    return [torch.tensor(v, dtype=torch.int64) for v in values]


def _value_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


# (name, B, H, Sq, Sk, D, prefix_len, valid_len, q_offset): M6 prefixes, causal (prefix 0),
# bidirectional (prefix == valid), padded rows and a sample with valid_len 0, Sk not a multiple of
# the 128-key tile, Sq = 1 decode with a per-sample offset, a query block after a cache.
CASES = [
    ("mixed prefixes", 3, 2, 70, 70, 32, [20, 0, 70], [70, 61, 70], 0),
    ("padded rows, empty sample", 3, 2, 45, 45, 64, [10, 0, 0], [45, 30, 0], 0),
    ("two key tiles plus a ragged one", 2, 2, 150, 300, 48, [40, 0], [300, 290], [150, 140]),
    ("decode, per-sample offset", 3, 4, 1, 37, 64, [5, 0, 12], [30, 37, 20], [29, 36, 25]),
    ("block after a cache", 2, 2, 9, 40, 80, [3, 0], [40, 35], [31, 20]),
    ("head dim 128", 2, 1, 66, 66, 128, [33, 0], [66, 50], 0),
]


@pytest.mark.parametrize("name,b,h,sq,sk,d,prefix,valid,q_offset", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_fp32(name, b, h, sq, sk, d, prefix, valid, q_offset):
    q, k, v = _qkv(b, h, sq, sk, d)
    prefix_len, valid_len = _lengths(prefix, valid)
    offset = torch.tensor(q_offset) if isinstance(q_offset, list) else q_offset
    grad = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(1))
    fused = _value_and_grads(lambda *t: prefix_lm_attention(*t, prefix_len, valid_len, q_offset=offset), q, k, v, grad)
    ref = _value_and_grads(lambda *t: prefix_lm_attention_reference(*t, prefix_len, valid_len, q_offset=offset),
                           q, k, v, grad)
    for got, want, what in zip(fused, ref, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{name}: {what}")


def test_padded_rows_are_zero_with_zero_gradients():
    q, k, v = _qkv(2, 2, 12, 12, 32)
    prefix_len, valid_len = _lengths([4, 0], [7, 0])
    out = prefix_lm_attention(q, k, v, prefix_len, valid_len)
    out.sum().backward()
    assert out[0, :, 7:].abs().max() == 0 and out[1].abs().max() == 0
    assert q.grad[0, :, 7:].abs().max() == 0 and q.grad[1].abs().max() == 0
    assert k.grad[0, :, 7:].abs().max() == 0 and v.grad[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_reference(dtype):
    # The reference runs in fp32 on the same half inputs; both round the output once to the half type.
    q, k, v = _qkv(2, 2, 140, 140, 64, dtype)
    prefix_len, valid_len = _lengths([60, 0], [140, 100])
    grad = torch.randn(2, 2, 140, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    fused = _value_and_grads(lambda *t: prefix_lm_attention(*t, prefix_len, valid_len), q, k, v, grad)
    ref = _value_and_grads(lambda *t: prefix_lm_attention_reference(*t, prefix_len, valid_len), q, k, v, grad)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want, what in zip(fused, ref, ("out", "dq", "dk", "dv")):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=what)


def test_output_memory_is_heads_merged_and_inputs_may_be_strided():
    # q, k, v as the model makes them: views of one (B, S, H, 3, D) projection.
    b, s, h, d = 2, 33, 4, 16
    qkv = torch.randn(b, s, h, 3, d)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
    prefix_len, valid_len = _lengths([10, 0], [33, 20])
    out = prefix_lm_attention(q, k, v, prefix_len, valid_len)
    assert out.shape == (b, h, s, d) and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, prefix_lm_attention_reference(q, k, v, prefix_len, valid_len),
                               atol=2e-5, rtol=1e-4)
    # A head dim that is not the unit stride is copied, not misread.
    qt = torch.randn(b, h, d, s).transpose(2, 3)
    torch.testing.assert_close(prefix_lm_attention(qt, k, v, prefix_len, valid_len),
                               prefix_lm_attention_reference(qt, k, v, prefix_len, valid_len), atol=2e-5, rtol=1e-4)


def test_saves_no_sq_by_sk_tensor():
    b, h, s, d = 2, 4, 256, 16
    q, k, v = _qkv(b, h, s, s, d)
    prefix_len, valid_len = _lengths([100, 0], [256, 256])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        prefix_lm_attention(q, k, v, prefix_len, valid_len)
    assert max(saved) <= b * h * s * d, saved                      # q, k, v, out, lse; no (S, S)
    assert sum(saved) <= 4 * b * h * s * d + b * h * s + 3 * b, saved


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(dropout_p):
    q, k, v = _qkv(2, 2, 6, 9, 8)
    prefix_len, valid_len = _lengths([2, 0], [9, 5])
    offset = torch.tensor([3, 0])
    torch.library.opcheck(torch.ops.m6.prefix_lm_attention,
                          (q, k, v, prefix_len, valid_len, offset, 0.35, dropout_p, 1234))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradcheck_fp64(dropout_p):
    q, k, v = _qkv(2, 2, 5, 7, 4, torch.float64)
    prefix_len, valid_len = _lengths([2, 0], [7, 4])
    offset = torch.tensor([2, 0])

    def fn(q, k, v):  # a fixed seed: the keep mask is a pure function of it
        return torch.ops.m6.prefix_lm_attention(q, k, v, prefix_len, valid_len, offset, 0.5, dropout_p, 99)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_bits_match_the_rng_rule():
    # With v = the identity (Sk = D), out = P' (the dropped probabilities) and the kept entries can be read off.
    b, h, s = 2, 3, 48
    q, k, _ = _qkv(b, h, s, s, s)
    v = torch.eye(s).expand(b, h, s, s).contiguous().requires_grad_()
    prefix_len, valid_len = _lengths([16, 0], [48, 40])
    seed, p = 2 ** 62 + 12345, 0.3
    out = torch.ops.m6.prefix_lm_attention(q, k, v, prefix_len, valid_len, torch.zeros(b, dtype=torch.long),
                                           s ** -0.5, p, seed)[0]
    keep = keep_mask(seed, (b, h, s, s), p)
    want = prefix_lm_attention_reference(q, k, v, prefix_len, valid_len, keep=keep, dropout_p=p)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    allowed = ops.prefix_lm_mask(prefix_len, valid_len, s, s).expand(b, h, s, s)
    kept = (out != 0) & allowed
    rate = kept.sum().item() / allowed.sum().item()
    assert abs(rate - (1 - p)) < 0.02, rate                       # ~9.6k allowed pairs: sd ~ 0.005
    # Backward regenerates the same mask: gradients equal the reference's under it.
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_dropout_reproducible_from_the_generator_and_fresh_per_call():
    q, k, v = _qkv(2, 2, 40, 40, 16)
    prefix_len, valid_len = _lengths([10, 0], [40, 40])

    def run():
        q.grad = k.grad = v.grad = None
        out = prefix_lm_attention(q, k, v, prefix_len, valid_len, dropout_p=0.2)
        out.sum().backward()
        return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()

    torch.manual_seed(7)
    first, second = run(), run()
    torch.manual_seed(7)
    again = run()
    for a, b in zip(first, again):
        assert torch.equal(a, b)                                   # bit for bit from the same RNG state
    assert not torch.equal(first[0], second[0])                     # the next call draws a new seed
    torch.testing.assert_close(prefix_lm_attention(q, k, v, prefix_len, valid_len),
                               prefix_lm_attention_reference(q, k, v, prefix_len, valid_len), atol=2e-5, rtol=1e-4)


def test_reference_gemm_path_agrees_with_the_blas():
    # M6_CPU_GEMM=reference runs the tile products in plain loops (csrc/common/cpu_gemm.h).
    code = (
        "import torch, m6_engine.ops as ops, m6_engine._C as C\n"
        "from m6_engine.ops.attention import prefix_lm_attention\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 2, 70, 24, generator=g).requires_grad_() for _ in range(3))\n"
        "out = prefix_lm_attention(q, k, v, torch.tensor([30, 0]), torch.tensor([70, 50]))\n"
        "out.backward(torch.ones_like(out))\n"
        "torch.save({'blas': C.cpu_gemm_uses_blas(), 'values': [out.detach(), q.grad, k.grad, v.grad]}, '{path}')\n")
    results = {}
    for mode in ("blas", "reference"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"m6_attention_gemm_{os.getpid()}_{mode}.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("M6_CPU_GEMM", None)
        if mode == "reference":
            env["M6_CPU_GEMM"] = "reference"
        subprocess.run([sys.executable, "-c", code.replace("{path}", path)], cwd=ROOT, env=env, check=True,
                       timeout=120)
        results[mode] = torch.load(path)
        os.remove(path)
    assert results["reference"]["blas"] is False
    for a, b in zip(results["blas"]["values"], results["reference"]["values"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_what_is_wrong():
    q, k, v = _qkv(2, 2, 8, 8, 16)
    prefix_len, valid_len = _lengths([2, 0], [8, 8])
    with pytest.raises(RuntimeError, match="prefix_len must be <= valid_len"):
        prefix_lm_attention(q, k, v, torch.tensor([9, 0]), valid_len)
    with pytest.raises(RuntimeError, match="valid_len must be <= Sk = 8"):
        prefix_lm_attention(q, k, v, prefix_len, torch.tensor([9, 8]))
    with pytest.raises(RuntimeError, match="k and v must have one shape"):
        prefix_lm_attention(q, k, v[:, :, :5], prefix_len, valid_len)
    with pytest.raises(RuntimeError, match="q and k must have one head dim"):
        prefix_lm_attention(q, k[..., :8], v[..., :8], prefix_len, valid_len)
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        prefix_lm_attention(q, k, v.double(), prefix_len, valid_len)
    with pytest.raises(RuntimeError, match=r"valid_len must have shape \(B,\) = \(2,\)"):
        prefix_lm_attention(q, k, v, prefix_len, torch.tensor([8]))
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        prefix_lm_attention(q, k, v, prefix_len, valid_len, dropout_p=1.0)
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        prefix_lm_attention(q[0], k, v, prefix_len, valid_len)
