"""The fused scaled masked softmax with M6's prefix-LM mask: ``torch.ops.m6.masked_softmax``.

The mask is computed from three integers per sample (docs/design.md, "One sequence, one mask rule"):
query i of sample b (absolute position ``q_offset[b] + i``) may attend key j iff
``j < valid_len[b] and (j < prefix_len[b] or j <= q_offset[b] + i)``. Bidirectional
(``prefix_len == valid_len``), causal (``prefix_len == 0``) and padding-only masks are special cases;
a per-sample ``q_offset`` lets one call place query rows of samples that start at different
positions (a decode step over prompts of different lengths).

Forward:   y = softmax(scale * x) over the allowed keys, 0 elsewhere; padded query rows are 0.
Backward:  dx = scale * y * (dy - sum(dy * y, -1)), from the saved output y only (masked y = 0).
Shapes:    scores (B, H, Sq, Sk) fp32 | fp16 | bf16, or fp64 on the CPU; prefix_len, valid_len,
           q_offset (B,) int32 | int64 on scores' device. Math in fp32 (fp64 for fp64: the exact
           path, e.g. for gradcheck).
"""

import operator

import torch

from m6_engine.ops._dtypes import kernel_dtype_ok, kernel_dtypes_text
from m6_engine.ops._extension import extension_available, require_extension

_INT64 = torch.iinfo(torch.int64)


def q_offset_tensor(q_offset, scores: torch.Tensor) -> torch.Tensor:
    """``q_offset`` as the op takes it: a (B,) tensor is passed through (the op checks it), an int
    becomes a (B,) int64 tensor of that value on scores' device (one small fill, no host sync)."""
    if isinstance(q_offset, torch.Tensor):
        return q_offset
    q_offset = operator.index(q_offset)
    if not _INT64.min <= q_offset <= _INT64.max:
        # torch.full would fail with a message that does not say which argument overflowed.
        raise RuntimeError(f"masked_softmax: q_offset must fit in int64, got {q_offset}")
    return torch.full((scores.shape[0],), q_offset, dtype=torch.int64, device=scores.device)


def masked_softmax(scores, prefix_len, valid_len, scale: float = 1.0, q_offset=0):
    """Fused scaled masked softmax; see the module docstring for the math and shapes.

    ``q_offset``: an int (the same offset for every sample) or a (B,) int32 | int64 tensor on
    scores' device (one per sample).
    """
    require_extension()
    return torch.ops.m6.masked_softmax(scores, prefix_len, valid_len, float(scale),
                                       q_offset_tensor(q_offset, scores))


def _check_meta(scores, prefix_len, valid_len, q_offset):
    # The values are checked by the real kernels; the fake kernel sees only shapes.
    torch._check(scores.dim() == 4, lambda: f"masked_softmax: scores must be 4-D (B, H, Sq, Sk), got {scores.dim()}-D")
    torch._check(kernel_dtype_ok(scores.dtype, scores.device),
                 lambda: f"masked_softmax: scores must be {kernel_dtypes_text(scores.device)}, got {scores.dtype}")
    for name, t in (("prefix_len", prefix_len), ("valid_len", valid_len), ("q_offset", q_offset)):
        torch._check(t.dtype in (torch.int32, torch.int64),
                     lambda: f"masked_softmax: {name} must be int32 or int64, got {t.dtype}")
        torch._check(t.dim() == 1 and t.shape[0] == scores.shape[0],
                     lambda: f"masked_softmax: {name} must have shape (B,) = ({scores.shape[0]},), got {tuple(t.shape)}")
        # A meta tensor mixed with real ones dispatches here, not to a real kernel: check devices
        # here too, or the mix would return an uninitialised tensor.
        torch._check(t.device == scores.device,
                     lambda: f"masked_softmax: {name} must be on scores's device {scores.device}, got {t.device}")


def _fake_forward(scores, prefix_len, valid_len, scale, q_offset):
    _check_meta(scores, prefix_len, valid_len, q_offset)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _fake_backward(grad_out, out, prefix_len, valid_len, scale, q_offset):
    _check_meta(out, prefix_len, valid_len, q_offset)
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, prefix_len, valid_len, scale, q_offset = inputs
    ctx.save_for_backward(output, prefix_len, valid_len, q_offset)
    ctx.scale = scale


def _backward(ctx, grad_out):
    out, prefix_len, valid_len, q_offset = ctx.saved_tensors
    grad = torch.ops.m6.masked_softmax_backward(
        grad_out.contiguous(), out, prefix_len, valid_len, ctx.scale, q_offset)
    return grad, None, None, None, None


def _no_double_backward(ctx, grad):
    # Without an autograd kernel, torch would let a second derivative through this op with a
    # warning and a wrong (incomplete) result; refuse it instead.
    raise RuntimeError("masked_softmax: double backward is not supported (the op is differentiable once)")


def register():
    """Attach the fake kernels and autograd to the C++-defined ops (once, at import)."""
    torch.library.register_fake("m6::masked_softmax")(_fake_forward)
    torch.library.register_fake("m6::masked_softmax_backward")(_fake_backward)
    torch.library.register_autograd("m6::masked_softmax", _backward, setup_context=_setup_context)
    torch.library.register_autograd("m6::masked_softmax_backward", _no_double_backward)


if extension_available():
    register()
