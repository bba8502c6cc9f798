"""Public fused ops of m6-engine and the one place that chooses fused vs reference.

``masked_softmax`` and ``layer_norm`` are ``torch.library`` custom ops (namespace ``m6``) with CPU
and CUDA kernels, autograd and fake kernels; ``reference`` holds their plain-PyTorch twins, which
are also the test oracles. Calling a fused op without the built extension raises
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
from m6_engine.ops.layer_norm import layer_norm
from m6_engine.ops.masked_softmax import masked_softmax
from m6_engine.ops.output_cache import cpu_output_cache_stats, empty_cpu_output_cache, set_cpu_output_cache_limit
from m6_engine.ops.reference import layer_norm_reference, masked_softmax_reference, prefix_lm_mask


@dataclass(frozen=True)
class OpSet:
    """The kernels a model runs: fused or reference, chosen once."""

    masked_softmax: Callable
    layer_norm: Callable
    fused: bool


def select_ops(fused: bool) -> OpSet:
    """Return the fused ops (requires the extension; raises if it is missing) or the references."""
    if fused:
        require_extension()
        return OpSet(masked_softmax=masked_softmax, layer_norm=layer_norm, fused=True)
    return OpSet(masked_softmax=masked_softmax_reference, layer_norm=layer_norm_reference, fused=False)


__all__ = [
    "ExtensionNotBuiltError", "OpSet", "cpu_capability", "cpu_output_cache_stats", "cuda_kernels_built",
    "empty_cpu_output_cache", "extension_available", "set_cpu_output_cache_limit",
    "layer_norm", "layer_norm_reference", "masked_softmax", "masked_softmax_reference",
    "prefix_lm_mask", "require_extension", "select_ops",
]
