"""Our fused LayerNorm as a megatron-core norm module, for its layer specs.

megatron-core builds a norm from a spec as ``module(config=..., hidden_size=..., eps=...)`` (Apex's
``FusedLayerNorm`` and ``WrappedTorchNorm`` take the same arguments); without Apex it falls back to
``torch.nn.LayerNorm``. :class:`M6LayerNorm` runs ``m6_engine.ops.layer_norm`` instead:

    y = (x - mean) / sqrt(var + eps) * gamma + beta      over the last dim, fp32 statistics
    gamma = weight (+ 1 with ``config.layernorm_zero_centered_gamma``)

x (..., hidden_size) in fp32 / fp16 / bf16 on the CPU or the GPU; weight, bias (hidden_size,) in
``config.params_dtype``. With ``config.sequence_parallel`` the parameters carry Megatron's
``sequence_parallel`` flag, so their gradients are all-reduced over tp as for Apex's norm.
Use it in a spec: ``TransformerLayerSubmodules(input_layernorm=M6LayerNorm, ...)``, or take
:func:`megatron_ext.spec.local_gpt_layer_spec` which does so.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from m6_engine import ops as m6_ops


class M6LayerNorm(nn.Module):
    """LayerNorm over the last dim by ``m6_engine.ops.layer_norm``; Megatron's norm signature."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "LayerNorm"):
        super().__init__()
        # `persist_layer_norm` picks one of Apex's two kernels; ours has one, so it changes nothing.
        if config.normalization != "LayerNorm":
            raise ValueError(f"M6LayerNorm implements LayerNorm, but TransformerConfig.normalization "
                             f"is {config.normalization!r}")
        m6_ops.require_extension()
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma or zero_centered_gamma
        self.eps = eps
        dtype = config.params_dtype
        self.weight = nn.Parameter(torch.full((hidden_size,), 0.0 if self.zero_centered_gamma else 1.0,
                                              dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in (self.weight, self.bias):
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return m6_ops.layer_norm(x, weight, self.bias, self.eps)
