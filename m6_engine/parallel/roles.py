"""A parameter's parallel role: what the layers, the data-parallel wrapper and the pipeline say
about it, kept in one typed record on the parameter (:func:`param_role`) instead of loose
attributes read with ``getattr``.

- ``tp_dim``: the dim it is split along over the tp group, in rank order (``parallel.layers``);
  None: replicated over tp, with identical gradients on every tp rank by construction.
- ``sequence_parallel``: replicated over tp, but applied to this rank's sequence positions only
  (sequence parallelism: the LayerNorms, the embeddings' position / segment tables and patch
  projection), so each tp rank's gradient is a partial sum; ``parallel.grad_sync`` sums it over tp
  after the data-parallel reduction.
- ``tied_across_stages``: one copy of a weight shared by the first and last pipeline stage
  (``parallel.tied``; the word embedding and the output head).
- ``main_grad``: the fp32 tensor of the parameter's shape its gradient accumulates in
  (``parallel.data_parallel``); None outside a DataParallel wrapper. Read it where the gradient is
  written, never keep it: with ZeRO-2 it is a view of a bucket-sized staging tensor that exists
  only from the bucket's first gradient until its reduce-scatter, so the wrapper installs a
  *source* (``main_grad_source``) that hands out the current one; assigning a tensor installs a
  fixed one.
- ``main_grad_added``: called by a backward that accumulated the weight gradient straight into
  ``main_grad`` (the tp linear layers, when the dtypes allow: gradient-accumulation fusion), so
  the wrapper counts it ready as it would a ``.grad``; set by DataParallel.
"""

from dataclasses import dataclass
from typing import Callable

import torch

_ATTRIBUTE = "_m6_parallel_role"


@dataclass(eq=False)
class ParamRole:
    """The parallel role of one parameter (module docstring)."""

    tp_dim: int | None = None
    sequence_parallel: bool = False
    tied_across_stages: bool = False
    main_grad_source: Callable[[], torch.Tensor] | None = None
    main_grad_added: Callable[[], None] | None = None

    @property
    def main_grad(self) -> torch.Tensor | None:
        """The tensor this parameter's gradient accumulates in now (module docstring)."""
        return None if self.main_grad_source is None else self.main_grad_source()

    @main_grad.setter
    def main_grad(self, tensor: torch.Tensor | None) -> None:
        self.main_grad_source = None if tensor is None else (lambda: tensor)

    def takes_fused_grad(self, dtype: torch.dtype) -> bool:
        """Whether a backward may add a gradient of ``dtype`` into ``main_grad`` itself (and then
        call ``main_grad_added``): under DataParallel, with main_grad of that dtype (fp32)."""
        # The buffers DataParallel hands out are fp32 (ZeRO-2's staging included): no need to
        # materialise one to ask.
        return self.main_grad_added is not None and dtype == torch.float32


def param_role(param: torch.Tensor) -> ParamRole:
    """The role of ``param`` (a parameter or a buffer); a plain replicated role until something
    marks it. The record lives on the tensor, so it follows the parameter through ``module.to``."""
    role = param.__dict__.get(_ATTRIBUTE)
    if role is None:
        role = ParamRole()
        setattr(param, _ATTRIBUTE, role)
    return role


def mark_sequence_parallel(params) -> None:
    """Mark ``params`` as applied to this rank's sequence positions only (``ParamRole.sequence_parallel``)."""
    for param in params:
        param_role(param).sequence_parallel = True
