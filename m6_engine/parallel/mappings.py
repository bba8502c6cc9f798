"""The conjugate tensor-parallel region operators, as paired autograd functions.

Each takes the tensor-parallel group explicitly (``state.group("tp")``); with a one-rank group
each is the identity. ``t`` is the group size, ``r`` this rank's index in it; "split" and "gather"
act on the last tensor dim (size ``n`` before a split, ``n / t`` after).

    operator         forward                       backward
    copy_to_tp       identity                      all-reduce (sum)
    reduce_from_tp   all-reduce (sum)              identity
    scatter_to_tp    keep chunk r of the last dim  all-gather the last dim
    gather_from_tp   all-gather the last dim       keep chunk r of the last dim

copy/reduce and scatter/gather are each other's adjoints, which is why they come in pairs.
"""

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # A copy: the input may still be referenced elsewhere in the graph.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-1] % size:
        raise ValueError(f"cannot split the last dim of size {x.shape[-1]} into {size} "
                         "tensor-parallel chunks")
    chunk = x.shape[-1] // size
    return x.narrow(-1, rank * chunk, chunk).contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceFromTPInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region: identity forward, all-reduce of the gradient. Any shape."""
    return x if dist.get_world_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group, *, in_place: bool = False) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward.

    ``in_place`` sums into ``x`` itself instead of a copy: for a fresh tensor nothing else reads
    (a layer's own partial output), saving one copy of it."""
    if dist.get_world_size(group) == 1:
        return x
    return (_ReduceFromTPInPlace if in_place else _ReduceFromTP).apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n) -> this rank's chunk (..., n / t); backward all-gathers the gradient."""
    return x if dist.get_world_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n / t) -> (..., n), chunks in rank order; backward keeps this rank's chunk."""
    return x if dist.get_world_size(group) == 1 else _GatherFromTP.apply(x, group)
