"""Fused LayerNorm over the last dim: ``torch.ops.m6.layer_norm``.

Forward:  mean, var over the last dim (fp32 math; fp64 for fp64 x); rstd = 1/sqrt(var + eps);
          y = (x - mean) * rstd * weight + bias.
Backward: xhat = (x - mean) * rstd, g = dy * weight;
          dx = rstd * (g - mean(g) - xhat * mean(g * xhat));
          dweight = sum_rows(dy * xhat); dbias = sum_rows(dy).
Shapes:   x (..., N) fp32 | fp16 | bf16, or fp64 on the CPU (the exact path, e.g. for gradcheck),
          N up to 65536; weight, bias (N,) of x's dtype; mean, rstd (rows,) fp32 (fp64 for fp64 x)
          with rows = x.numel() / N.
"""

import math

import torch

from m6_engine.ops._dtypes import kernel_dtype_ok, kernel_dtypes_text, stats_dtype
from m6_engine.ops._extension import extension_available, require_extension
_MAX_HIDDEN = 65536  # kLayerNormMaxHidden of csrc/layer_norm/layer_norm.h


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """Fused LayerNorm; see the module docstring for the math and shapes."""
    require_extension()
    y, _, _ = torch.ops.m6.layer_norm(x, weight, bias, float(eps))
    return y


def _check_meta(x, *params):
    """Shape, dtype and device checks of x and its (N,) parameters, worded as the C++ checks."""
    torch._check(x.dim() >= 1, lambda: "layer_norm: x must have at least one dim")
    torch._check(kernel_dtype_ok(x.dtype, x.device),
                 lambda: f"layer_norm: x must be {kernel_dtypes_text(x.device)}, got {x.dtype}")
    torch._check(1 <= x.shape[-1] <= _MAX_HIDDEN,
                 lambda: f"layer_norm: hidden size (x's last dim) must be in [1, {_MAX_HIDDEN}], got {x.shape[-1]}")
    for name, t in zip(("weight", "bias"), params):
        torch._check(t.dim() == 1 and t.shape[0] == x.shape[-1],
                     lambda: f"layer_norm: {name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")
        torch._check(t.dtype == x.dtype, lambda: f"layer_norm: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        # A meta tensor mixed with real ones dispatches here, not to a real kernel: check devices
        # here too, or the mix would return an uninitialised tensor.
        torch._check(t.device == x.device, lambda: f"layer_norm: {name} must be on x's device {x.device}, got {t.device}")


def _fake_forward(x, weight, bias, eps):
    _check_meta(x, weight, bias)
    torch._check(math.isfinite(eps) and eps >= 0, lambda: f"layer_norm: eps must be a finite number >= 0, got {eps}")
    rows = x.numel() // x.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    stats = x.new_empty((rows,), dtype=stats_dtype(x.dtype))
    return y, stats, torch.empty_like(stats)


def _fake_backward(grad_y, x, weight, mean, rstd):
    _check_meta(x, weight)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.m6.layer_norm_backward(
        grad_y.contiguous(), x, weight, mean, rstd)
    return grad_x, grad_weight, grad_bias, None


def _no_double_backward(ctx, *grads):
    # Without an autograd kernel, torch would let a second derivative through this op with a
    # warning and a wrong (incomplete) result; refuse it instead.
    raise RuntimeError("layer_norm: double backward is not supported (the op is differentiable once)")


def register():
    """Attach the fake kernels and autograd to the C++-defined ops (once, at import)."""
    torch.library.register_fake("m6::layer_norm")(_fake_forward)
    torch.library.register_fake("m6::layer_norm_backward")(_fake_backward)
    torch.library.register_autograd("m6::layer_norm", _backward, setup_context=_setup_context)
    torch.library.register_autograd("m6::layer_norm_backward", _no_double_backward)


if extension_available():
    register()
