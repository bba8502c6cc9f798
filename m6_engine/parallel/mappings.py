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

Sequence parallelism (Megatron's SP) adds three along the sequence dim (dim 1 of (B, S, d); each
rank holds positions [r S / t, (r + 1) S / t)):

    operator                    forward                         backward
    scatter_to_sequence         keep chunk r of dim 1           all-gather dim 1
    gather_from_sequence        all-gather dim 1                keep chunk r of dim 1
    reduce_scatter_to_sequence  reduce-scatter dim 1 (sum)      all-gather dim 1

``gather_from_sequence``'s backward assumes what follows it is replicated over tp (every rank
computes the same gradient, as the loss head's do); a tensor-parallel consumer whose gradient is
partial over tp is fed by the column-parallel layer's own gather instead (``parallel.layers``),
whose backward reduce-scatters. The flat collectives work on the rank-major layout (t, B, S / t, d),
so dim 1 is moved to the front and back with one copy each way.
"""

import torch
import torch.distributed as dist

from m6_engine.parallel.collectives import all_gather_single, reduce_scatter_single


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


def _region_operator(name: str, forward, backward) -> type:
    """An autograd function ``apply(x, group)`` computing ``forward(x, group)``, whose backward is
    ``backward(grad, group)``: every operator of the tables above but the in-place reduce."""

    def forward_(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def backward_(ctx, grad):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_),
                                                   "backward": staticmethod(backward_)})


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x.view_as(x)     # a new tensor object, so autograd records the operator


_CopyToTP = _region_operator("_CopyToTP", _identity, _all_reduce)
_ReduceFromTP = _region_operator("_ReduceFromTP", _all_reduce, _identity)
_ScatterToTP = _region_operator("_ScatterToTP", _split_last, _gather_last)
_GatherFromTP = _region_operator("_GatherFromTP", _gather_last, _split_last)


class _ReduceFromTPInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


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


def sequence_chunk(seq_length: int, tp_size: int, what: str = "sequence length") -> int:
    """S / t, or a ValueError naming ``what`` when the sequence does not split evenly."""
    if seq_length % tp_size:
        raise ValueError(f"sequence parallelism splits the sequence over the {tp_size} tensor-parallel "
                         f"ranks: {what} {seq_length} is not divisible by {tp_size}")
    return seq_length // tp_size


def split_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S, ...) -> this rank's positions (B, S / t, ...), a contiguous copy."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = sequence_chunk(x.shape[1], size)
    return x.narrow(1, rank * chunk, chunk).contiguous()


def all_gather_sequence(x: torch.Tensor, group, *, async_op: bool = False):
    """(B, S / t, ...) on every rank -> (B, S, ...), positions in rank order. With ``async_op``
    returns (work, finish) where ``finish()`` (after ``work.wait()``) gives the tensor."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    stacked = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_single(stacked, x, group=group, async_op=async_op)

    def finish() -> torch.Tensor:                     # (t, B, S/t, ...) -> (B, t * S/t, ...)
        parts = stacked.view(size, *x.shape)
        return parts.transpose(0, 1).reshape(x.shape[0], size * x.shape[1], *x.shape[2:])

    return (work, finish) if async_op else finish()


def reduce_scatter_sequence(x: torch.Tensor, group, *, async_op: bool = False):
    """(B, S, ...) partial sums on every rank -> the sum's positions of this rank (B, S / t, ...).
    With ``async_op`` returns (work, out): ``out`` holds the result once ``work.wait()`` returned."""
    size = dist.get_world_size(group)
    chunk = sequence_chunk(x.shape[1], size)
    b, rest = x.shape[0], x.shape[2:]
    stacked = x.reshape(b, size, chunk, *rest).transpose(0, 1).contiguous()    # (t, B, S/t, ...)
    out = torch.empty((b, chunk, *rest), dtype=x.dtype, device=x.device)
    work = reduce_scatter_single(out, stacked.view(size * b, chunk, *rest), group=group, async_op=async_op)
    return (work, out) if async_op else out


_ScatterToSequence = _region_operator("_ScatterToSequence", split_sequence, all_gather_sequence)
_GatherFromSequence = _region_operator("_GatherFromSequence", all_gather_sequence, split_sequence)
_ReduceScatterToSequence = _region_operator("_ReduceScatterToSequence", reduce_scatter_sequence,
                                            all_gather_sequence)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated (B, S, ...) -> this rank's positions (B, S / t, ...); backward all-gathers."""
    return x if dist.get_world_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S / t, ...) -> (B, S, ...) for a replicated consumer; backward keeps this rank's positions."""
    return x if dist.get_world_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums (B, S, ...) -> this rank's positions of the sum (B, S / t, ...); backward all-gathers."""
    return x if dist.get_world_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
