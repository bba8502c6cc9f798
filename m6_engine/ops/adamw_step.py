"""Fused AdamW update on the CPU: ``torch.ops.m6.adamw_step_``, the host step of ZeRO-Offload.

Update of a tensor p at step t = 1, 2, ... (in place, fp32 math; csrc/optim/adamw_cpu.cpp):

    g = grad * grad_scale                  (loss unscaling and the clip coefficient, folded in)
    p <- p * (1 - lr * weight_decay)
    m <- beta1 m + (1 - beta1) g           v <- beta2 v + (1 - beta2) g^2
    p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    param_copy <- p cast to param_copy's dtype   (when given: the half weights for the GPU)

One pass over memory, vectorised and threaded; the arithmetic is torch.optim.AdamW's (foreach and
fused), in its order. Shapes: param, exp_avg, exp_avg_sq, grad fp32, contiguous, one numel, on the
CPU; param_copy fp32 | fp16 | bf16, contiguous, param's numel. The plain-PyTorch twin is
``m6_engine.ops.reference.adamw_step_reference_``.
"""

import math

import torch

from m6_engine.ops._extension import extension_available, require_extension
from m6_engine.ops.reference import adamw_step_reference_  # noqa: F401  (the twin, importable from here)

_COPY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE = ("param", "exp_avg", "exp_avg_sq", "grad")


@torch.no_grad()
def adamw_step_(param, exp_avg, exp_avg_sq, grad, *, lr: float, betas, eps: float, weight_decay: float,
                step: int, grad_scale: float = 1.0, param_copy=None) -> None:
    """One fused AdamW update of ``param``, ``exp_avg``, ``exp_avg_sq`` in place (and of
    ``param_copy`` when given); see the module docstring for the math and shapes."""
    require_extension()
    beta1, beta2 = betas
    torch.ops.m6.adamw_step_(param, exp_avg, exp_avg_sq, grad, param_copy, float(lr), float(beta1), float(beta2),
                             float(eps), float(weight_decay), int(step), float(grad_scale))


def _check_tensors(param, exp_avg, exp_avg_sq, grad, param_copy):
    """The tensor checks of the C++ kernel, worded as it words them. Meta tensors are let through
    (no kernel runs), CUDA ones are not: the op has no CUDA kernel."""
    torch._check(param.device.type in ("cpu", "meta"),
                 lambda: f"adamw_step_: param must be a CPU tensor, got {param.device}")
    for name, t in zip(_STATE, (param, exp_avg, exp_avg_sq, grad)):
        torch._check(t.dtype == torch.float32, lambda: f"adamw_step_: {name} must be float32, got {t.dtype}")
        # A meta tensor mixed with CPU ones dispatches here, not to the kernel: check devices here too.
        torch._check(t.device == param.device,
                     lambda: f"adamw_step_: {name} must be on param's device {param.device}, got {t.device}")
        torch._check(t.numel() == param.numel(),
                     lambda: f"adamw_step_: {name} must have param's numel {param.numel()}, got {t.numel()}")
        torch._check(t.is_contiguous(), lambda: f"adamw_step_: {name} must be contiguous")
    if param_copy is None:
        return
    torch._check(param_copy.dtype in _COPY_DTYPES,
                 lambda: f"adamw_step_: param_copy must be float32, float16 or bfloat16, got {param_copy.dtype}")
    torch._check(param_copy.device == param.device,
                 lambda: f"adamw_step_: param_copy must be on param's device {param.device}, got {param_copy.device}")
    torch._check(param_copy.numel() == param.numel(),
                 lambda: f"adamw_step_: param_copy must have param's numel {param.numel()}, got {param_copy.numel()}")
    torch._check(param_copy.is_contiguous(), lambda: "adamw_step_: param_copy must be contiguous")


def _check_number(x, name):
    torch._check(math.isfinite(x) and x >= 0, lambda: f"adamw_step_: {name} must be a finite number >= 0, got {x}")


def _fake_step(param, exp_avg, exp_avg_sq, grad, param_copy, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    _check_tensors(param, exp_avg, exp_avg_sq, grad, param_copy)
    _check_number(lr, "lr")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        torch._check(0 <= beta < 1, lambda: f"adamw_step_: {name} must be in [0, 1), got {beta}")
    for name, x in (("eps", eps), ("weight_decay", weight_decay), ("grad_scale", grad_scale)):
        _check_number(x, name)
    torch._check(step >= 1, lambda: f"adamw_step_: step must be >= 1 (the number of this update), got {step}")


def register():
    """Attach the fake kernel to the C++-defined op (once, at import)."""
    torch.library.register_fake("m6::adamw_step_")(_fake_step)


if extension_available():
    register()
