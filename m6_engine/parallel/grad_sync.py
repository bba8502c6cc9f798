"""Who finishes a step's gradient reduction: the step's owner, through two callables it hands the
schedule (``parallel.schedules.forward_backward``).

A stage's gradients are complete after the last backward of a step only once (1) its data-parallel
buckets (:class:`~m6_engine.parallel.data_parallel.DataParallel`) have finished their all-reduce or
reduce-scatter, (2) under sequence parallelism the replicated parameters that saw only this tp
rank's positions (``ParamRole.sequence_parallel``) have summed their gradients over tp, and (3) the
copies of weights tied across first and last stage have summed their gradients (``parallel.tied``).
Sums over dp and tp commute, so (2) runs once per step on the dp-reduced gradient, and only on the
elements this rank's optimizer reads (its ZeRO pieces): one flat all-reduce over tp. The schedules look for none of these: whoever builds the step (the Trainer,
a test driving a schedule) passes

- ``finalize_grads()``: called once after the last backward (timed as the step's grad sync);
- ``no_sync()``: a context around every earlier backward, deferring data-parallel reduction.

:func:`model_grad_sync` gives both for a stage.
"""

import contextlib
import functools
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from m6_engine.parallel.data_parallel import DataParallel
from m6_engine.parallel.roles import param_role
from m6_engine.parallel.state import ParallelState
from m6_engine.parallel.tied import allreduce_tied_grads


def _sequence_parallel_grads(model: nn.Module) -> list[torch.Tensor]:
    """The gradient tensors of the sequence-parallel parameters that this rank's optimizer reads."""
    if isinstance(model, DataParallel):
        return [model.grad_piece(i, lo, hi) for i, lo, hi in model.reduced_pieces()
                if param_role(model.params[i]).sequence_parallel]
    return [p.grad for p in model.parameters()
            if param_role(p).sequence_parallel and p.grad is not None]


def allreduce_sequence_parallel_grads(model: nn.Module, state: ParallelState) -> None:
    """Sum the sequence-parallel parameters' gradients over tp (one flat all-reduce; collective
    on "tp", a no-op at tp = 1 or without such parameters)."""
    if state.tp_size == 1:
        return
    grads = _sequence_parallel_grads(model)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=state.group("tp"))
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def finalize_model_grads(model: nn.Module, state: ParallelState) -> None:
    """Finish the data-parallel reduction (a DataParallel stage), sum the sequence-parallel
    parameters' gradients over tp, then the tied weights' over first and last stage. Collective
    over dp, tp and the embedding group."""
    if isinstance(model, DataParallel):
        model.finish_grad_sync()
    allreduce_sequence_parallel_grads(model, state)
    allreduce_tied_grads(model, state)


def model_grad_sync(model: nn.Module, state: ParallelState) -> dict[str, Callable]:
    """``finalize_grads`` and ``no_sync`` of ``model``, as keyword arguments of forward_backward."""
    no_sync: Callable[[], ContextManager] = (model.no_sync if isinstance(model, DataParallel)
                                             else contextlib.nullcontext)
    return {"finalize_grads": functools.partial(finalize_model_grads, model, state), "no_sync": no_sync}
