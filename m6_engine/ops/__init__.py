"""Public fused ops of m6-engine and the one place that chooses fused vs reference.

``masked_softmax`` and ``layer_norm`` are ``torch.library`` custom ops (namespace ``m6``) with CPU
and CUDA kernels, autograd and fake kernels; ``prefix_lm_attention`` is one with a CPU kernel (on
CUDA it runs torch's FlexAttention / SDPA for the same mask, ``ops.attention``); ``adamw_step_`` is
the in-place AdamW update on the CPU (ZeRO-Offload's host step, ``ops.adamw_step``); ``normal_shard_``
fills one shard of a full tensor with counter-based N(0, std) draws, on the CPU and CUDA (the layout-
independent weight initialisation, ``ops.normal_shard``; ``philox4x32_10`` its integers); ``reference``
holds their plain-PyTorch twins, which are also the test oracles. Calling a fused op without the built extension raises
:class:`ExtensionNotBuiltError` with build instructions; the model takes the reference path only
when its config says so (:func:`select_ops`).
"""

from dataclasses import dataclass
from typing import Callable

from m6_engine.ops._extension import (
    ExtensionNotBuiltError,
    cpu_capability,
    cuda_kernels_built,
    extension_available,
    require_extension,
)
from m6_engine.ops.adamw_step import adamw_step_
from m6_engine.ops.attention import (
    log_attention_backend,
    prefix_lm_attention,
    resolve_attention_backend,
    sdpa_attention,
)
from m6_engine.ops.layer_norm import layer_norm
from m6_engine.ops.masked_softmax import masked_softmax
from m6_engine.ops.normal_shard import normal_shard_, philox4x32_10
from m6_engine.ops.output_cache import cpu_output_cache_stats, empty_cpu_output_cache, set_cpu_output_cache_limit
from m6_engine.ops.reference import (
    adamw_step_reference_,
    layer_norm_reference,
    masked_softmax_reference,
    normal_shard_reference,
    philox4x32_10_reference,
    prefix_lm_attention_reference,
    prefix_lm_mask,
)


@dataclass(frozen=True)
class OpSet:
    """The kernels a model runs: fused or reference, chosen once.

    ``attention``: the attention core ``(q, k, v, prefix_len, valid_len, *, scale, q_offset,
    dropout_p) -> out`` of the resolved ``attention_backend`` ("fused" or "sdpa"), or None for
    "unfused" (the model's matmul, ``masked_softmax``, matmul).
    """

    masked_softmax: Callable
    layer_norm: Callable
    fused: bool
    attention_backend: str = "unfused"
    attention: Callable | None = None


def select_ops(fused: bool, attention_backend: str = "unfused", device="cpu") -> OpSet:
    """Return the fused ops (requires the extension; raises if it is missing) or the references,
    with the attention core ``attention_backend`` resolves to on ``device``
    (:func:`resolve_attention_backend`; ValueError naming the problem when it cannot run there)."""
    resolved = resolve_attention_backend(attention_backend, fused, device)
    attention = {"fused": prefix_lm_attention, "sdpa": sdpa_attention, "unfused": None}[resolved]
    if fused:
        require_extension()
        return OpSet(masked_softmax=masked_softmax, layer_norm=layer_norm, fused=True,
                     attention_backend=resolved, attention=attention)
    return OpSet(masked_softmax=masked_softmax_reference, layer_norm=layer_norm_reference, fused=False,
                 attention_backend=resolved, attention=attention)


__all__ = [
    "ExtensionNotBuiltError", "OpSet", "adamw_step_", "adamw_step_reference_", "cpu_capability",
    "cpu_output_cache_stats", "cuda_kernels_built",
    "empty_cpu_output_cache", "extension_available", "set_cpu_output_cache_limit",
    "layer_norm", "layer_norm_reference", "log_attention_backend", "masked_softmax", "masked_softmax_reference",
    "normal_shard_", "normal_shard_reference", "philox4x32_10", "philox4x32_10_reference",
    "prefix_lm_attention", "prefix_lm_attention_reference", "prefix_lm_mask", "require_extension",
    "resolve_attention_backend", "sdpa_attention", "select_ops",
]
