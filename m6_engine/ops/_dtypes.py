"""The storage dtypes the fused ops accept, per device, worded as csrc/common/dtypes.h.

float32, float16 and bfloat16 everywhere (math in fp32); float64 on the CPU only, where the kernels
run a plain double loop: the exact path for ``torch.autograd.gradcheck``. The CUDA kernels compute in
fp32 and reject float64. Meta tensors carry no kernel and accept what the CPU accepts.
"""

import torch

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_dtype_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """True when the kernels on ``device`` take tensors of ``dtype``."""
    return dtype in _FAST_DTYPES or (dtype == torch.float64 and device.type != "cuda")


def kernel_dtypes_text(device: torch.device) -> str:
    """The accepted dtypes as the error messages name them."""
    if device.type == "cuda":
        return "float32, float16 or bfloat16 (float64 is CPU-only)"
    return "float32, float64, float16 or bfloat16"


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of layer_norm's per-row mean and rstd: float64 for float64 x, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
