"""The attention backends built from torch ops (``m6_engine.ops.attention_torch``) against the plain
reference: SDPA with the boolean mask (values and gradients, dropout), FlexAttention's block mask
(forward on the CPU, where FlexAttention has no backward; values and gradients on a GPU)."""

import warnings

import pytest
import torch

from m6_engine.ops.attention_torch import flex_attention_available, flex_prefix_lm_attention, sdpa_prefix_lm_attention
from m6_engine.ops.reference import prefix_lm_attention_reference

needs_flex = pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (name, B, H, Sq, Sk, D, prefix_len, valid_len, q_offset): causal and bidirectional samples, padded
# rows and an empty sample, a decode step with per-sample offsets, Sk past flex's 128-key block.
CASES = [
    ("mixed, padded, empty", 3, 2, 20, 20, 16, [5, 0, 0], [20, 12, 0], 0),
    ("bidirectional", 2, 2, 17, 17, 8, [17, 9], [17, 9], 0),
    ("decode, per-sample offset", 3, 2, 1, 37, 16, [5, 0, 12], [30, 37, 20], [29, 36, 25]),
    ("block after a cache, Sk 140", 2, 1, 9, 140, 8, [3, 0], [140, 100], [131, 91]),
]


def _inputs(b, h, sq, sk, d, dtype=torch.float32, device="cpu", grad=True):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
               for shape in ((b, h, sq, d), (b, h, sk, d), (b, h, sk, d))]
    return [t.requires_grad_(grad) for t in tensors]


def _case(case, device="cpu", dtype=torch.float32, grad=True):
    _, b, h, sq, sk, d, prefix, valid, offset = case
    q, k, v = _inputs(b, h, sq, sk, d, dtype, device, grad)
    lengths = [torch.tensor(x, device=device) for x in (prefix, valid)]
    offset = torch.tensor(offset, device=device) if isinstance(offset, list) else offset
    return q, k, v, lengths, offset, d ** -0.5


def _compare(fn, case, device="cpu", dtype=torch.float32, atol=2e-5):
    q, k, v, (prefix, valid), offset, scale = _case(case, device, dtype)
    out = fn(q, k, v, prefix, valid, scale, offset)
    ref = prefix_lm_attention_reference(q, k, v, prefix, valid, scale, offset)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b, what in zip((out, *got), (ref, *want), ("out", "dq", "dk", "dv")):
        assert not a.isnan().any(), what
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol, msg=f"{case[0]}: {what}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sdpa_matches_reference_with_gradients(case):
    _compare(sdpa_prefix_lm_attention, case)


def test_sdpa_bf16_matches_reference():
    _compare(sdpa_prefix_lm_attention, CASES[0], dtype=torch.bfloat16, atol=3e-2)


def test_sdpa_padded_rows_are_zero_with_zero_gradients():
    q, k, v, (prefix, valid), offset, scale = _case(CASES[0])
    out = sdpa_prefix_lm_attention(q, k, v, prefix, valid, scale, offset)
    out.sum().backward()
    assert out[1, :, 12:].abs().max() == 0 and out[2].abs().max() == 0
    assert q.grad[2].abs().max() == 0 and k.grad[2].abs().max() == 0 and v.grad[1, :, 12:].abs().max() == 0


def test_sdpa_dropout_follows_the_generator():
    q, k, v, (prefix, valid), offset, scale = _case(CASES[1], grad=False)

    def run(seed):
        torch.manual_seed(seed)
        return sdpa_prefix_lm_attention(q, k, v, prefix, valid, scale, offset, dropout_p=0.5)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert not torch.equal(run(3), sdpa_prefix_lm_attention(q, k, v, prefix, valid, scale, offset))


@needs_flex
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flex_block_mask_matches_reference_forward(case):
    # FlexAttention has no backward on the CPU; the mask_mod and block mask are what is ours.
    q, k, v, (prefix, valid), offset, scale = _case(case, grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "flex_attention called without torch.compile()"
        out = flex_prefix_lm_attention(q, k, v, prefix, valid, scale, offset)
    torch.testing.assert_close(out, prefix_lm_attention_reference(q, k, v, prefix, valid, scale, offset),
                               atol=2e-5, rtol=2e-5)


def test_bad_shapes_name_the_argument():
    q, k, v, (prefix, valid), offset, scale = _case(CASES[0], grad=False)
    with pytest.raises(ValueError, match="q must be 4-D"):
        sdpa_prefix_lm_attention(q[0], k, v, prefix, valid, scale)
    with pytest.raises(ValueError, match=r"valid_len must have shape \(B,\) = \(3,\)"):
        flex_prefix_lm_attention(q, k, v, prefix, valid[:2], scale)
    with pytest.raises(ValueError, match="must agree in batch, heads and head dim"):
        sdpa_prefix_lm_attention(q, k[..., :8], v[..., :8], prefix, valid, scale)


@needs_cuda
@needs_flex
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flex_on_cuda_matches_reference_with_gradients(case):
    _compare(flex_prefix_lm_attention, case, device="cuda")


@needs_cuda
def test_sdpa_on_cuda_bf16_matches_reference():
    big = ("m6 prefix", 2, 4, 528, 528, 64, [272, 0], [528, 400], 0)
    _compare(sdpa_prefix_lm_attention, big, device="cuda", dtype=torch.bfloat16, atol=3e-2)


@needs_cuda
@needs_flex
def test_flex_on_cuda_bf16_matches_reference():
    big = ("m6 prefix", 2, 4, 528, 528, 64, [272, 0], [528, 400], 0)
    _compare(flex_prefix_lm_attention, big, device="cuda", dtype=torch.bfloat16, atol=3e-2)
