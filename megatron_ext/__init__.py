"""Interoperability of m6-engine with Megatron-LM / megatron-core (optional: ``pip install .[megatron]``).

- ``megatron_ext.kernels``: Apex's softmax modules (``scaled_masked_softmax_cuda``, ...) on our
  kernel, for Megatron without Apex; :func:`install_kernels` puts them where Megatron looks.
- ``megatron_ext.norm``: our fused LayerNorm as a megatron-core norm (``M6LayerNorm``);
  ``megatron_ext.spec``: layer specs using it and our prefix-LM attention core.
- ``megatron_ext.model``: M6 built from megatron-core's transformer block, trained by its schedules.
- ``megatron_ext.convert``: our full state dicts <-> megatron-core GPTModel / M6-on-mcore state
  dicts, any tp / pp on either side.
- ``megatron_ext.testing``: a CPU test shim for megatron-core's CUDA-only calls (tests only).

Importing this package needs megatron-core; the rest of m6-engine never imports it.
"""

import warnings

PROVEN_MEGATRON_CORE = "0.16.1"
"""The megatron-core release this package is tested with (the ``megatron`` extra pins it)."""
INSTALL_HINT = (f"pip install 'megatron-core=={PROVEN_MEGATRON_CORE}' "
                "(or `pip install '.[megatron]'` in the m6-engine checkout)")

try:
    import megatron.core as _megatron_core
except ImportError as error:
    raise ImportError(f"megatron_ext needs megatron-core, which is not importable ({error}); "
                      f"install it with: {INSTALL_HINT}. The rest of m6-engine works without it.") from error

if getattr(_megatron_core, "__version__", None) != PROVEN_MEGATRON_CORE:
    warnings.warn(f"megatron_ext is tested with megatron-core {PROVEN_MEGATRON_CORE}, found "
                  f"{getattr(_megatron_core, '__version__', 'unknown')}: module paths and signatures "
                  "it relies on may differ", stacklevel=2)

from megatron_ext.kernels import install_kernels, installed_kernels  # noqa: E402

__all__ = ["INSTALL_HINT", "PROVEN_MEGATRON_CORE", "install_kernels", "installed_kernels"]
