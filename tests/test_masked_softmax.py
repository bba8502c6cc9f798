"""m6::masked_softmax (forward and backward) against the float64 reference, three ways.

The three-way rule (docs/conventions.md): with the float64 reference as the exact answer, the kernel's error
may not exceed twice the error of the same-precision PyTorch composite (masked_fill + softmax in
the scores' dtype), plus a small floor. Masked and padded positions must be exact zeros.
float64 (CPU only) is the kernels' exact path: it must match the reference to 1e-12 and pass
torch.autograd.gradcheck.
"""

import contextlib

import pytest
import torch

import m6_engine.ops as ops
from m6_engine.ops.masked_softmax import q_offset_tensor
from m6_engine.ops.reference import masked_softmax_reference, prefix_lm_mask
from tests.conftest import DEVICES, nan_filled_empty

SCALE = 0.37
# Absolute error floor per dtype: about one unit in the last place at probability 1; float64 is
# held to 1e-12 (the reference is float64 too, so its composite error is ~1e-16).
FLOOR = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _mixed_lengths(sk):
    """(prefix_len, valid_len) per sample: causal, bidirectional, prefix-LM, prefix-LM + pad, all pad."""
    return [(0, sk), (sk, sk), (sk // 3, sk), (sk // 4, sk - sk // 3), (0, 0)]


def _lengths(pairs, dtype=torch.int64, device="cpu"):
    prefix = torch.tensor([p for p, _ in pairs], dtype=dtype, device=device)
    valid = torch.tensor([v for _, v in pairs], dtype=dtype, device=device)
    return prefix, valid


def _scores(b, h, sq, sk, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(b, h, sq, sk, generator=gen)).to(device=device, dtype=dtype)


def _composite(scores, prefix, valid, scale, q_offset):
    """The unfused path in the scores' own dtype: masked_fill with a materialised mask, softmax."""
    allowed = prefix_lm_mask(prefix, valid, scores.shape[2], scores.shape[3], q_offset)  # (B, 1, Sq, Sk)
    probs = torch.softmax((scores * scale).masked_fill(~allowed, float("-inf")), dim=-1)
    return probs.masked_fill(~allowed, 0.0)


def _assert_three_way(kernel, composite, exact, floor, what):
    err_kernel = (kernel.double() - exact).abs().max().item()
    err_torch = (composite.double() - exact).abs().max().item()
    assert err_kernel <= 2 * err_torch + floor, (
        f"{what}: kernel error {err_kernel:.3g} > 2 x torch composite error {err_torch:.3g} + {floor:.1g}")


def _assert_masked_zero(out, prefix, valid, q_offset):
    allowed = prefix_lm_mask(prefix, valid, out.shape[2], out.shape[3], q_offset).expand_as(out)
    assert torch.all(out[~allowed] == 0), "a masked or padded position is not exactly 0"


def _check_forward(scores, prefix, valid, q_offset, scale=SCALE, poison=False):
    with nan_filled_empty() if poison else contextlib.nullcontext():
        out = ops.masked_softmax(scores, prefix, valid, scale, q_offset)
    assert out.shape == scores.shape and out.dtype == scores.dtype and out.is_contiguous()
    exact = masked_softmax_reference(scores.double(), prefix, valid, scale, q_offset)
    composite = _composite(scores, prefix, valid, scale, q_offset)
    _assert_three_way(out, composite, exact, FLOOR[scores.dtype], "forward")
    _assert_masked_zero(out, prefix, valid, q_offset)
    return out


def _grads(fn, scores, grad_out):
    x = scores.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, grad_out)
    return g


def _check_backward(scores, prefix, valid, q_offset, scale=SCALE, poison=False):
    grad_out = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(scores)
    with nan_filled_empty() if poison else contextlib.nullcontext():
        kernel = _grads(lambda x: ops.masked_softmax(x, prefix, valid, scale, q_offset), scores, grad_out)
    composite = _grads(lambda x: _composite(x, prefix, valid, scale, q_offset), scores, grad_out)
    exact = _grads(lambda x: masked_softmax_reference(x, prefix, valid, scale, q_offset),
                   scores.double(), grad_out.double())
    assert kernel.dtype == scores.dtype
    # Gradients are O(scale * |dy|): the floor grows with them.
    floor = FLOOR[scores.dtype] * max(1.0, exact.abs().max().item())
    _assert_three_way(kernel, composite, exact, floor, "backward")
    _assert_masked_zero(kernel, prefix, valid, q_offset)


# (Sq, Sk, q_offset): square masks, long rows, decoding with a KV cache, Sq != Sk both ways.
CASES = [(1, 1, 0), (3, 3, 0), (17, 17, 0), (528, 528, 0), (24, 4097, 0), (24, 4097, 4073),
         (7, 17, 10), (17, 7, 0), (1, 528, 527)]


@pytest.mark.parametrize("sq,sk,q_offset", CASES)
@pytest.mark.parametrize("length_dtype", [torch.int64, torch.int32])
def test_forward_fp32(sq, sk, q_offset, length_dtype):
    prefix, valid = _lengths(_mixed_lengths(sk), length_dtype)
    _check_forward(_scores(len(prefix), 2, sq, sk), prefix, valid, q_offset)


@pytest.mark.parametrize("sq,sk,q_offset", [c for c in CASES if c[0] * c[1] <= 200_000])
def test_backward_fp32(sq, sk, q_offset):
    prefix, valid = _lengths(_mixed_lengths(sk))
    _check_backward(_scores(len(prefix), 2, sq, sk), prefix, valid, q_offset)


def test_scale_and_extreme_scores():
    # Large logits test the max subtraction; a negative scale flips which key is the max.
    prefix, valid = _lengths(_mixed_lengths(33))
    scores = 50 * _scores(5, 1, 33, 33)
    for scale in (1.0, -0.5, 0.0):
        _check_forward(scores, prefix, valid, 0, scale)


@pytest.mark.parametrize("sk", [32768, 32771])
def test_long_rows(sk):
    # 2 x 128 rows of >= 32768 keys (odd Sk misaligns the rows): outputs of >= 32 MiB, written
    # with non-temporal stores into blocks of the output cache, which may hold an earlier output
    # (or fresh zeros): poison them, or an unwritten element would go unnoticed.
    sq, q_offset = 128, 29950
    prefix, valid = _lengths([(0, sk), (20000, 30000)])
    scores = _scores(2, 1, sq, sk)
    out = _check_forward(scores, prefix, valid, q_offset, poison=True)
    assert torch.all(out[1, :, 30000 - q_offset:] == 0)  # sample 1's rows from 30000 on are padding
    _check_backward(scores, prefix, valid, q_offset, poison=True)


def test_infinite_and_nan_scores():
    # A -inf score the mask allows gets probability exactly 0; a NaN score makes its whole row NaN,
    # as in the composite (so an overflow upstream is not turned into plausible numbers).
    prefix, valid = _lengths([(0, 40), (40, 40)])
    scores = _scores(2, 1, 40, 40)
    scores[0, 0, 30, 5] = float("-inf")
    scores[1, 0, 7, 33] = float("nan")
    out = ops.masked_softmax(scores, prefix, valid, SCALE, 0)
    exact = masked_softmax_reference(scores.double(), prefix, valid, SCALE, 0)
    assert out[0, 0, 30, 5] == 0
    assert out[1, 0, 7].isnan().all() and exact[1, 0, 7].isnan().all()
    finite = ~exact.isnan()
    torch.testing.assert_close(out.double()[finite], exact[finite], atol=FLOOR[torch.float32], rtol=0)
    assert finite.sum() == out.numel() - 40


def test_streaming_stores_on_short_rows():
    # Outputs of >= 16 MiB take the non-temporal store path: with 17 keys a row is shorter than two
    # vectors, so its unaligned head, aligned middle and tail overlap in every way across rows.
    prefix, valid = _lengths([(0, 17), (17, 17), (5, 17), (4, 11)])
    scores = _scores(4, 4, 16384, 17)
    assert scores.nbytes >= 16 * 2**20
    _check_forward(scores, prefix, valid, 0, poison=True)
    _check_backward(scores, prefix, valid, 0, poison=True)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("sk,dtype", [(17, torch.float32), (528, torch.float32), (17, torch.float64)])
def test_non_contiguous(layout, sk, dtype):
    prefix, valid = _lengths(_mixed_lengths(sk))
    base = _scores(5, 2, sk, 2 * sk, dtype)
    scores = base[..., :sk].transpose(2, 3) if layout == "transposed" else base[..., ::2]
    assert not scores.is_contiguous() and scores.shape == (5, 2, sk, sk)
    _check_forward(scores, prefix, valid, 0)
    _check_backward(scores, prefix, valid, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq,sk,q_offset", [(17, 17, 0), (8, 528, 520), (5, 1000, 0)])
def test_half_precision(dtype, sq, sk, q_offset):
    prefix, valid = _lengths(_mixed_lengths(sk))
    scores = _scores(5, 2, sq, sk, dtype)
    _check_forward(scores, prefix, valid, q_offset)
    _check_backward(scores, prefix, valid, q_offset)


@pytest.mark.parametrize("device", DEVICES)
def test_every_element_written(device):
    # With deterministic fill, every at::empty (the kernels' outputs included) starts as NaN: a
    # position the kernel forgot to write would stay NaN.
    prefix, valid = _lengths(_mixed_lengths(70), device=device)
    scores = _scores(5, 3, 70, 70, device=device)
    with nan_filled_empty():
        assert torch.empty(16, device=device).isnan().all(), "poisoning is not active"
        out = ops.masked_softmax(scores, prefix, valid, SCALE, 0)
        grad = torch.ops.m6.masked_softmax_backward(torch.ones_like(out), out, prefix, valid, SCALE,
                                                    q_offset_tensor(0, out))
    exact = masked_softmax_reference(scores.double(), prefix, valid, SCALE, 0)
    assert not out.isnan().any() and not grad.isnan().any()
    torch.testing.assert_close(out.double(), exact, atol=1e-6, rtol=0)
    _assert_masked_zero(grad, prefix, valid, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_cpu(device):
    # The CUDA kernel against the CPU kernel (and both against float64 above); runs on a GPU only
    # where one is present.
    prefix, valid = _lengths(_mixed_lengths(300), torch.int32)
    scores = _scores(5, 2, 40, 300, torch.bfloat16 if device == "cuda" else torch.float32)
    out = _check_forward(scores.to(device), prefix.to(device), valid.to(device), 260)
    torch.testing.assert_close(out.cpu().float(), ops.masked_softmax(scores, prefix, valid, SCALE, 260).float(),
                               atol=FLOOR[scores.dtype], rtol=0)


# float64 cases: (name, [(prefix_len, valid_len) per sample], Sq, Sk, q_offset, scale).
FP64_CASES = [
    ("causal", [(0, 7), (0, 7)], 7, 7, 0, 1.0),
    ("full prefix", [(7, 7), (7, 7)], 5, 7, 0, SCALE),
    ("prefix-lm, q_offset", [(3, 7), (1, 7)], 5, 7, 2, SCALE),
    ("padding", [(2, 5), (0, 4)], 5, 7, 0, 1.7),
    ("decode row", [(0, 7), (4, 6)], 1, 7, 6, SCALE),
    ("Sq > Sk, negative scale", [(2, 4), (0, 3)], 6, 4, 0, -0.5),
    ("mixed, all-pad sample", _mixed_lengths(7), 5, 7, 1, SCALE),
]
FP64_IDS = [c[0] for c in FP64_CASES]


@pytest.mark.parametrize("name,pairs,sq,sk,q_offset,scale", FP64_CASES, ids=FP64_IDS)
def test_fp64_matches_reference(name, pairs, sq, sk, q_offset, scale):
    prefix, valid = _lengths(pairs)
    scores = _scores(len(pairs), 2, sq, sk, torch.float64)
    _check_forward(scores, prefix, valid, q_offset, scale)
    _check_backward(scores, prefix, valid, q_offset, scale)


def test_fp64_long_rows_match_reference():
    # Rows longer than any vector or task size, decoding at the end of a long cache.
    prefix, valid = _lengths([(0, 4097), (2000, 3000)])
    scores = _scores(2, 1, 8, 4097, torch.float64)
    _check_forward(scores, prefix, valid, 4089, poison=True)
    _check_backward(scores, prefix, valid, 4089, poison=True)


# Per-sample q_offset: one call places every sample's query rows at their own positions. The
# samples of _mixed_lengths(sk) (causal, bidirectional, prefix-LM, prefix-LM + pad, all pad) get
# offsets 0, Sk - 1, one that pads the last half of the rows, one past valid_len (all rows padding)
# and a middle one.
def _per_sample_offsets(sk, sq, dtype=torch.int64):
    return torch.tensor([0, sk - 1, sk - (sq + 1) // 2, sk - sk // 3 + 1, sk // 2], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sq,sk", [(1, 17), (6, 17), (8, 528)])
@pytest.mark.parametrize("offset_dtype", [torch.int64, torch.int32])
def test_per_sample_q_offset(dtype, sq, sk, offset_dtype):
    prefix, valid = _lengths(_mixed_lengths(sk))
    q_offset = _per_sample_offsets(sk, sq, offset_dtype)
    scores = _scores(5, 2, sq, sk, dtype)
    out = _check_forward(scores, prefix, valid, q_offset, poison=True)
    _check_backward(scores, prefix, valid, q_offset, poison=True)
    # Each sample as its own call with an int offset: the per-sample tensor changes nothing else.
    for b in range(5):
        alone = ops.masked_softmax(scores[b:b + 1], prefix[b:b + 1], valid[b:b + 1], SCALE, int(q_offset[b]))
        torch.testing.assert_close(out[b:b + 1], alone, atol=0, rtol=0)
    assert torch.all(out[3] == 0)  # sample 3's offset lies past its valid_len


def test_gradcheck_per_sample_q_offset():
    prefix, valid = _lengths(_mixed_lengths(7))
    scores = _scores(5, 2, 3, 7, torch.float64).requires_grad_()
    q_offset = _per_sample_offsets(7, 3)
    assert torch.autograd.gradcheck(lambda x: ops.masked_softmax(x, prefix, valid, SCALE, q_offset), (scores,))


def test_q_offset_int_or_tensor():
    # An int is the same offset for every sample; a (B,) tensor of int32 or int64 gives the same
    # result, and so does the reference (the model's unfused path) with either form.
    prefix, valid = _lengths(_mixed_lengths(17))
    scores = _scores(5, 2, 4, 17)
    by_int = ops.masked_softmax(scores, prefix, valid, SCALE, 9)
    for dtype in (torch.int64, torch.int32):
        by_tensor = ops.masked_softmax(scores, prefix, valid, SCALE, torch.full((5,), 9, dtype=dtype))
        torch.testing.assert_close(by_tensor, by_int, atol=0, rtol=0)
    torch.testing.assert_close(masked_softmax_reference(scores, prefix, valid, SCALE, 9),
                               masked_softmax_reference(scores, prefix, valid, SCALE, torch.full((5,), 9)))
    torch.testing.assert_close(ops.masked_softmax(scores, prefix, valid, SCALE),
                               ops.masked_softmax(scores, prefix, valid, SCALE, torch.zeros(5, dtype=torch.int32)),
                               atol=0, rtol=0)
    offsets = q_offset_tensor(9, scores)
    assert offsets.shape == (5,) and offsets.dtype == torch.int64 and torch.all(offsets == 9)


@pytest.mark.parametrize("huge", [2**62, 2**63 - 1])
def test_huge_q_offset_is_padding(huge):
    # q_offset + i would overflow int64: the kernel clamps the offset to valid_len first (a row at or
    # past valid_len is padding either way), so every row of that sample is zeros, and the others
    # are unaffected; the reference clamps alike.
    prefix, valid = _lengths([(2, 9), (0, 9)])
    scores = _scores(2, 1, 5, 9, torch.float64)
    q_offset = torch.tensor([huge, 3])
    out = _check_forward(scores, prefix, valid, q_offset, poison=True)
    _check_backward(scores, prefix, valid, q_offset, poison=True)
    assert torch.all(out[0] == 0) and torch.all(out[1].sum(-1)[:, :5] > 0.99)
    assert torch.all(prefix_lm_mask(prefix, valid, 5, 9, q_offset)[0] == 0)


@pytest.mark.parametrize("name,pairs,sq,sk,q_offset,scale", FP64_CASES, ids=FP64_IDS)
def test_gradcheck_fp64(name, pairs, sq, sk, q_offset, scale):
    # gradcheck at its default (float64) step and tolerances: masked keys and padded rows have
    # zero numerical and analytical gradients alike.
    prefix, valid = _lengths(pairs)
    scores = _scores(len(pairs), 2, sq, sk, torch.float64).requires_grad_()
    fn = lambda x: ops.masked_softmax(x, prefix, valid, scale, q_offset)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (scores,))


def test_double_backward_raises():
    prefix, valid = _lengths([(2, 5), (0, 4)])
    scores = _scores(2, 2, 5, 7, torch.float64).requires_grad_()
    out = ops.masked_softmax(scores, prefix, valid, SCALE, 0)
    (grad,) = torch.autograd.grad(out, scores, torch.randn_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="masked_softmax: double backward is not supported"):
        grad.sum().backward()


def test_meta_and_fake_tensors():
    prefix, valid = _lengths([(1, 4), (0, 3)], device="meta")
    scores = torch.empty(2, 3, 5, 4, dtype=torch.bfloat16, device="meta")
    out = ops.masked_softmax(scores, prefix, valid, 0.5, 1)
    assert out.shape == scores.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    grad = torch.ops.m6.masked_softmax_backward(out, out, prefix, valid, 0.5, q_offset_tensor(1, out))
    assert grad.shape == scores.shape and grad.device.type == "meta"
    assert ops.masked_softmax(scores.double(), prefix, valid, 0.5, 1).dtype == torch.float64


def test_fake_cuda_rejects_fp64():
    # The CUDA kernels compute in fp32 and reject float64; the fake kernel must agree (fake CUDA
    # tensors need no GPU), naming the dtype.
    with torch._subclasses.fake_tensor.FakeTensorMode():
        scores = torch.empty(2, 1, 3, 4, dtype=torch.float64, device="cuda")
        lengths = torch.zeros(2, dtype=torch.int64, device="cuda")
        assert ops.masked_softmax(scores.float(), lengths, lengths).dtype == torch.float32
        with pytest.raises(RuntimeError, match=r"float16 or bfloat16 \(float64 is CPU-only\), got torch.float64"):
            ops.masked_softmax(scores, lengths, lengths)


def test_torch_compile_fullgraph():
    prefix, valid = _lengths(_mixed_lengths(17))

    def attention_probs(x):
        return ops.masked_softmax(x * 2, prefix, valid, SCALE, 0) * 3

    compiled = torch.compile(attention_probs, fullgraph=True, backend="aot_eager")
    scores = _scores(5, 2, 17, 17)
    grad_out = torch.randn_like(scores)
    torch.testing.assert_close(compiled(scores), attention_probs(scores), atol=0, rtol=0)
    torch.testing.assert_close(_grads(compiled, scores, grad_out), _grads(attention_probs, scores, grad_out),
                               atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_opcheck(dtype, offset_dtype):
    prefix, valid = _lengths([(1, 4), (0, 3), (0, 0)], torch.int32)
    q_offset = torch.tensor([1, 0, 2], dtype=offset_dtype)
    scores = _scores(3, 2, 5, 4, dtype).requires_grad_()
    torch.library.opcheck(torch.ops.m6.masked_softmax.default, (scores, prefix, valid, 0.5, q_offset))
    out = ops.masked_softmax(scores.detach(), prefix, valid, 0.5, q_offset)
    torch.library.opcheck(torch.ops.m6.masked_softmax_backward.default,
                          (torch.randn_like(out), out, prefix, valid, 0.5, q_offset))


def _good():
    prefix, valid = _lengths([(1, 4), (0, 3)])
    return _scores(2, 1, 3, 4), prefix, valid


def _bad_inputs():
    """(name, (scores, prefix_len, valid_len, q_offset), expected message) for each bad input."""
    x, p, v = _good()
    long = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    return [
        ("int scores", (x.int(), p, v, 0), "scores must be float32, float64, float16 or bfloat16, got Int"),
        ("complex scores", (x.cfloat(), p, v, 0), "scores must be float32, float64, float16 or bfloat16"),
        ("3-D scores", (x[0], p, v, 0), r"scores must be 4-D \(B, H, Sq, Sk\), got 3-D"),
        ("prefix of wrong length", (x, long([1, 0, 0]), v, 0), r"prefix_len must have shape \(B,\)"),
        ("2-D valid", (x, p, v.view(2, 1), 0), r"valid_len must have shape \(B,\)"),
        ("float lengths", (x, p.float(), v, 0), "prefix_len must be int32 or int64"),
        ("lengths on another device", (x, p, v.to("meta"), 0), "valid_len must be on scores's device"),
        ("scores on another device", (x.to("meta"), p, v, 0), "prefix_len must be on scores's device"),
        ("prefix > valid", (x, long([4, 0]), long([3, 3]), 0), "prefix_len must be <= valid_len"),
        ("valid > Sk", (x, p, long([4, 5]), 0), "valid_len must be <= Sk = 4"),
        ("negative prefix", (x, long([-1, 0]), v, 0), "lengths must be >= 0"),
        ("negative valid", (x, long([0, -2]), long([0, -1]), 0), "lengths must be >= 0"),
        ("negative q_offset", (x, p, v, -1), r"q_offset must be >= 0, got q_offset\[0\] = -1"),
        ("negative q_offset of one sample", (x, p, v, long([0, -3])),
         r"q_offset must be >= 0, got q_offset\[1\] = -3"),
        ("q_offset of wrong length", (x, p, v, long([0, 1, 2])), r"q_offset must have shape \(B,\) = \(2,\)"),
        ("2-D q_offset", (x, p, v, long([0, 1]).view(2, 1)), r"q_offset must have shape \(B,\)"),
        ("float q_offset", (x, p, v, torch.zeros(2)), "q_offset must be int32 or int64, got Float"),
        ("q_offset on another device", (x, p, v, long([0, 1]).to("meta")), "q_offset must be on scores's device"),
        ("q_offset past int64", (x, p, v, 2**63), "q_offset must fit in int64"),
    ]


@pytest.mark.parametrize("name,args,message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises(name, args, message):
    scores, prefix, valid, q_offset = args
    with pytest.raises(RuntimeError, match=message):
        ops.masked_softmax(scores, prefix, valid, 1.0, q_offset)


def test_bad_backward_input_raises():
    x, p, v = _good()
    out = ops.masked_softmax(x, p, v)
    zero = q_offset_tensor(0, out)
    with pytest.raises(RuntimeError, match="grad_out must have out's shape"):
        torch.ops.m6.masked_softmax_backward(out[..., :3], out, p, v, 1.0, zero)
    with pytest.raises(RuntimeError, match="grad_out must have out's dtype"):
        torch.ops.m6.masked_softmax_backward(out.half(), out, p, v, 1.0, zero)
    with pytest.raises(RuntimeError, match="grad_out must have out's dtype Double, got Float"):
        torch.ops.m6.masked_softmax_backward(out, out.double(), p, v, 1.0, zero)
    with pytest.raises(RuntimeError, match="valid_len must be <= Sk"):
        torch.ops.m6.masked_softmax_backward(out, out, p, v + 2, 1.0, zero)
    with pytest.raises(RuntimeError, match=r"q_offset must be >= 0, got q_offset\[1\] = -1"):
        torch.ops.m6.masked_softmax_backward(out, out, p, v, 1.0, torch.tensor([0, -1]))
    with pytest.raises(RuntimeError, match="q_offset must be int32 or int64"):
        torch.ops.m6.masked_softmax_backward(out, out, p, v, 1.0, zero.double())
