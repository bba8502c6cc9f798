"""Who finishes a step's gradient reduction: the step's owner, through two callables it hands the
schedule (``parallel.schedules.forward_backward``).

A stage's gradients are complete after the last backward of a step only once (1) its data-parallel
buckets (:class:`~m6_engine.parallel.data_parallel.DataParallel`) have finished their all-reduce or
reduce-scatter and (2) the copies of weights tied across first and last stage have summed their
gradients (``parallel.tied``). The schedules look for neither: whoever builds the step (the Trainer,
a test driving a schedule) passes

- ``finalize_grads()``: called once after the last backward (timed as the step's grad sync);
- ``no_sync()``: a context around every earlier backward, deferring data-parallel reduction.

:func:`model_grad_sync` gives both for a stage.
"""

import contextlib
import functools
from typing import Callable, ContextManager

from torch import nn

from m6_engine.parallel.data_parallel import DataParallel
from m6_engine.parallel.state import ParallelState
from m6_engine.parallel.tied import allreduce_tied_grads


def finalize_model_grads(model: nn.Module, state: ParallelState) -> None:
    """Finish the data-parallel reduction (a DataParallel stage), then sum the tied weights'
    gradients over first and last stage. Collective over dp and the embedding group."""
    if isinstance(model, DataParallel):
        model.finish_grad_sync()
    allreduce_tied_grads(model, state)


def model_grad_sync(model: nn.Module, state: ParallelState) -> dict[str, Callable]:
    """``finalize_grads`` and ``no_sync`` of ``model``, as keyword arguments of forward_backward."""
    no_sync: Callable[[], ContextManager] = (model.no_sync if isinstance(model, DataParallel)
                                             else contextlib.nullcontext)
    return {"finalize_grads": functools.partial(finalize_model_grads, model, state), "no_sync": no_sync}
