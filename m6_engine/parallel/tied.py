"""Weights shared between the first and last pipeline stage (the tied word embedding).

With pp > 1 the first stage owns the input word embedding and the last stage a copy of it as the
output head. The copies start equal (:func:`broadcast_tied_weights` from the first stage) and stay
equal because, after each backward, the embedding group sums their gradients
(:func:`allreduce_tied_grads`): both then apply the gradient of the one shared weight,
dL/dE = dL/dE(input lookup) + dL/dE(output head). With pp == 1 the stage uses one parameter twice
and autograd already sums the two contributions. Tied parameters are marked with
:func:`mark_tied`; first and last stage must mark the same number, in the same order.
"""

import torch
import torch.distributed as dist
from torch import nn

from m6_engine.parallel.roles import param_role
from m6_engine.parallel.state import ParallelState


def mark_tied(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as one copy of a weight shared by the first and last stage."""
    param_role(param).tied_across_stages = True
    return param


def tied_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The marked parameters of ``module``, in registration order."""
    return [p for p in module.parameters() if param_role(p).tied_across_stages]


def _embedding_group(module: nn.Module, state: ParallelState):
    params = tied_parameters(module)
    group = state.group("embedding")
    if params and group is None:
        raise RuntimeError(f"pipeline stage {state.pp_rank} holds tied parameters, but only the "
                           "first and last stage may (they share the embedding group)")
    if group is None or dist.get_world_size(group) == 1:
        return params, None
    return params, group


def broadcast_tied_weights(module: nn.Module, state: ParallelState) -> None:
    """Copy the first stage's tied weights to the last stage (collective on both)."""
    params, group = _embedding_group(module, state)
    if group is None:
        return
    src = min(state.group_ranks("embedding"))
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src, group=group)


def allreduce_tied_grads(module: nn.Module, state: ParallelState) -> None:
    """Sum the tied weights' gradients (``main_grad`` when data-parallel buffers hold them)."""
    params, group = _embedding_group(module, state)
    if group is None:
        return
    for p in params:
        grad = param_role(p).main_grad
        grad = p.grad if grad is None else grad
        if grad is None:
            raise RuntimeError("a tied parameter has no gradient after backward; the first and "
                               "last stage must both use their copy")
        dist.all_reduce(grad, group=group)
