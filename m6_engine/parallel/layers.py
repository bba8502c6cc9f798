"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

``t`` is the tensor-parallel size and ``r`` this rank's index in the tp group. Weights follow
``torch.nn.functional.linear``: W has shape (out, in) and y = x W^T + b.

A sharded parameter's role (``parallel.roles``) names the dim it is split along, in rank order;
parameters without one are replicated across tp and get identical gradients on every tp rank by
construction, so they need no tp reduction. Each layer initialises only its own shard of the full
weight from the generator it is given, so the full weight is the same for every tp
(``m6_engine.parallel.init``: the default N(0, std) draws the shard alone, on the layer's device
and in its dtype; a custom InitMethod draws the full master weight and the shard is copied out);
biases start at zero.

The two linear layers run as one autograd function each (:class:`_ColumnParallelLinear`,
:class:`_RowParallelLinear`, Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``
design) rather than ``F.linear`` between the region operators of ``mappings``: the all-reduce of
the column-parallel input gradient is launched asynchronously and overlaps the weight-gradient
matmul and the row-parallel partial output is reduced in place (it is a fresh tensor). Outputs
are plain ``torch.empty`` on every device: how the memory of large tensors is reused is the
allocator's business, below the ops, never a branch of this Python path.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from m6_engine.parallel.init import InitMethod, init_block_, normal_init
from m6_engine.parallel.mappings import (
    all_gather_sequence, gather_from_tp, reduce_from_tp, reduce_scatter_sequence,
    reduce_scatter_to_sequence, scatter_to_tp,
)
from m6_engine.parallel.roles import param_role
from m6_engine.parallel.state import ParallelState


def _divide(n: int, t: int, what: str) -> int:
    if n % t:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {t}")
    return n // t


def _sharded_weight(full_shape: tuple[int, int], dim: int, state: ParallelState, generator: torch.Generator,
                    init_method: InitMethod, dtype, device) -> nn.Parameter:
    """This tp rank's contiguous chunk along ``dim`` of the full (out, in) weight, as a parameter:
    only the chunk is initialised (``init.init_block_``)."""
    shape, offset = list(full_shape), [0, 0]
    shape[dim] //= state.tp_size
    offset[dim] = state.tp_rank * shape[dim]
    weight = init_block_(torch.empty(shape, dtype=dtype, device=device), full_shape, *offset, generator, init_method)
    param = nn.Parameter(weight)
    param_role(param).tp_dim = dim
    return param


def _bias(size: int, dtype, device, sharded: bool) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
    if sharded:
        param_role(param).tp_dim = 0
    return param


def _matmul_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) W^T (+ b) -> (..., out) in a fresh tensor.

    The buffer itself is returned, not a view of it: outputs of an autograd function that are
    views cannot be modified in place afterwards (the head's padding fill does)."""
    shape, dtype = (*x.shape[:-1], weight.shape[0]), torch.result_type(x, weight)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])        # (M, in), (M, out)
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)
    return out


def _weight_grads(ctx, grad2: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """dW = dy^T x (out, in) and db = sum_rows(dy), each None when not needed; dy (M, out).

    Gradient-accumulation fusion (Megatron's): when the weight's fp32 main_grad has dy's dtype
    (fp32 training), dW is accumulated into it inside the matmul (beta = 1), with no dW tensor
    and no separate add over it, and DataParallel is told the gradient is in (dW comes back None).
    Only for weights a layer uses once per forward (``ctx.fuse_weight_grad``): the tied output
    head's weight also gets the embedding lookup's gradient through the usual hook."""
    x2 = x.reshape(-1, x.shape[-1])
    grad_w = None
    if ctx.needs_input_grad[1]:
        role = param_role(weight)
        if ctx.fuse_weight_grad and role.takes_fused_grad(grad2.dtype):
            role.main_grad.addmm_(grad2.t(), x2)
            role.main_grad_added()
        else:
            grad_w = grad2.t().mm(x2)
    grad_b = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_w, grad_b


class _ColumnParallelLinear(torch.autograd.Function):
    """y_r = x W_r^T + b_r (copy_to_tp then linear); backward all-reduces dx = dy_r W_r over tp
    asynchronously while dW_r = dy_r^T x is computed. x (..., in), W_r (out/t, in), b_r (out/t,).

    With ``sequence_parallel`` x is this rank's positions (B, S/t, in): forward all-gathers it
    (B, S, in) and keeps only the shard for backward, which gathers it again (overlapping dx's
    matmul) and reduce-scatters dx (B, S, in) -> (B, S/t, in) overlapping dW_r (Megatron's SP)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, tp_size, fuse_weight_grad, sequence_parallel=False):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.tp_size, ctx.has_bias = group, tp_size, bias is not None
        ctx.fuse_weight_grad, ctx.sequence_parallel = fuse_weight_grad, sequence_parallel
        if sequence_parallel:
            x = all_gather_sequence(x, group)                                     # (B, S, in)
        return _matmul_out(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if ctx.sequence_parallel:
            return _ColumnParallelLinear._backward_sequence_parallel(ctx, grad, x, weight)
        grad2 = grad.reshape(-1, grad.shape[-1])                                   # (M, out/t)
        grad_x, work = None, None
        if ctx.needs_input_grad[0]:
            grad_x = grad2.mm(weight).view(x.shape)            # fresh, so reduced in place
            if ctx.tp_size > 1:
                work = dist.all_reduce(grad_x, group=ctx.group, async_op=True)
        grad_w, grad_b = _weight_grads(ctx, grad2, x, weight)
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None, None, None, None

    @staticmethod
    def _backward_sequence_parallel(ctx, grad, x_shard, weight):
        gathering, gathered = all_gather_sequence(x_shard, ctx.group, async_op=True)
        grad2 = grad.reshape(-1, grad.shape[-1])                                   # (M, out/t)
        grad_x_full = grad2.mm(weight) if ctx.needs_input_grad[0] else None        # (M, in)
        gathering.wait()
        x = gathered()                                                             # (B, S, in)
        work = grad_x = None
        if grad_x_full is not None:
            work, grad_x = reduce_scatter_sequence(grad_x_full.view(x.shape), ctx.group, async_op=True)
        grad_w, grad_b = _weight_grads(ctx, grad2, x, weight)
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None, None, None, None


class _RowParallelLinear(torch.autograd.Function):
    """y = all-reduce_tp(x_r W_r^T) + b, reduced in place in its fresh buffer; backward is local.
    x_r (..., in/t), W_r (out, in/t), b (out,) replicated.

    With ``sequence_parallel`` the partial sums are reduce-scattered instead, y (B, S/t, out) holds
    this rank's positions, and backward all-gathers dy first (B, S, out). db is summed over the
    gathered dy, so it is the whole bias gradient on every rank (no tp reduction needed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, tp_size, sequence_parallel=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.fuse_weight_grad = bias is not None, True
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        # With one rank the bias goes into the matmul; otherwise it is added once, after the sum.
        y = _matmul_out(x, weight, bias if tp_size == 1 else None)
        if tp_size > 1:
            if sequence_parallel:
                y = reduce_scatter_sequence(y, group)                             # (B, S/t, out)
            else:
                dist.all_reduce(y, group=group)
            if bias is not None:
                y.add_(bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if ctx.sequence_parallel:
            grad = all_gather_sequence(grad, ctx.group)                           # (B, S, out)
        grad2 = grad.reshape(-1, grad.shape[-1])                                   # (M, out)
        grad_x = grad2.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = _weight_grads(ctx, grad2, x, weight)
        return grad_x, grad_w, grad_b, None, None, None


class _VocabLookup(torch.autograd.Function):
    """e = E_r[ids] for ids in [0, V/t) (F.embedding); dE_r[i] = sum of de over the positions of
    id i. With ``fuse`` and an fp32 main_grad of de's dtype, those rows are added into main_grad
    (index_put_ with accumulate: no dense (V/t, dim) gradient, and deterministic on CUDA, where
    it sorts the indices, unlike index_add_'s atomics) and DataParallel is told; otherwise the
    dense gradient F.embedding's backward gives."""

    @staticmethod
    def forward(ctx, ids, weight, fuse):
        ctx.save_for_backward(ids)
        ctx.role, ctx.num_rows, ctx.fuse = param_role(weight), weight.shape[0], fuse
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        role = ctx.role
        if ctx.fuse and role.takes_fused_grad(grad.dtype):
            role.main_grad.index_put_((ids.reshape(-1),), grad.reshape(-1, grad.shape[-1]), accumulate=True)
            role.main_grad_added()
            return None, None, None
        return None, torch.ops.aten.embedding_dense_backward(grad, ids, ctx.num_rows, -1, False), None


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output dim: W_r (out/t, in), b_r (out/t,).

    Shapes:       x (..., in) replicated on the tp group -> y_r (..., out/t), or with
                  ``gather_output`` the full y (..., out).
    Forward:      y_r = x W_r^T + b_r                          (no communication)
    Input grad:   dx = all-reduce_tp(dy_r W_r)                 (async, overlapping dW_r)
    Weight grad:  dW_r = dy_r^T x,  db_r = sum(dy_r)           (local, no communication)

    ``sequence_parallel`` (tp > 1): x is this rank's positions (B, S/t, in), all-gathered into
    the matmul; the input grad is reduce-scattered back to (B, S/t, in) instead of all-reduced.
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, *,
                 generator: torch.Generator, bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod = normal_init(), dtype=torch.float32, device=None,
                 sequence_parallel: bool = False):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel and gather_output do not combine "
                             "(the sequence-parallel input is gathered, the output stays split)")
        self.sequence_parallel = sequence_parallel and state.tp_size > 1
        device = state.device if device is None else device
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = _divide(out_features, state.tp_size, "ColumnParallelLinear out_features")
        self.gather_output = gather_output
        self.group, self.tp_size = state.group("tp"), state.tp_size
        self.weight = _sharded_weight((out_features, in_features), 0, state, generator, init_method,
                                      dtype, device)   # (out/t, in)
        self.bias = _bias(self.out_per_rank, dtype, device, sharded=True) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ColumnParallelLinear.apply(x, self.weight, self.bias, self.group, self.tp_size, True,
                                        self.sequence_parallel)
        return gather_from_tp(y, self.group) if self.gather_output else y   # (..., out/t)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input dim: W_r (out, in/t); b (out,) replicated.

    Shapes:       x_r (..., in/t) (``input_is_parallel``) or the full x (..., in), which is then
                  split -> y (..., out), replicated on the tp group.
    Forward:      y = all-reduce_tp(x_r W_r^T) + b
    Input grad:   dx_r = dy W_r                                (local; all-gathered if x was full)
    Weight grad:  dW_r = dy^T x_r,  db = sum(dy)               (local, no communication)

    ``sequence_parallel`` (tp > 1): y is reduce-scattered to this rank's positions (B, S/t, out)
    instead of all-reduced; backward all-gathers dy.
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, *,
                 generator: torch.Generator, bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod = normal_init(), dtype=torch.float32, device=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel and state.tp_size > 1
        device = state.device if device is None else device
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _divide(in_features, state.tp_size, "RowParallelLinear in_features")
        self.input_is_parallel = input_is_parallel
        self.group, self.tp_size = state.group("tp"), state.tp_size
        self.weight = _sharded_weight((out_features, in_features), 1, state, generator, init_method,
                                      dtype, device)   # (out, in/t)
        self.bias = _bias(out_features, dtype, device, sharded=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)                          # (..., in/t)
        return _RowParallelLinear.apply(x, self.weight, self.bias, self.group, self.tp_size,
                                        self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """Word embedding split along the vocabulary: rank r holds rows [r V/t, (r+1) V/t).

    The vocabulary is padded up to V = a multiple of ``vocab_multiple * t`` (Megatron's rule, so
    every shard has the same, aligned size). Real rows are this shard's rows of the full
    (vocab_size, dim) weight drawn from the generator; padding rows are zero and are never
    predicted: :meth:`logits` sets their columns to -inf.

    Shapes:       ids (...) int, replicated on the tp group -> (..., dim), replicated; with
                  ``sequence_parallel`` ids (B, S) -> this rank's positions (B, S/t, dim).
    Forward:      e = all-reduce_tp(E_r[ids - r V/t] masked to zero where ids are not in shard r)
                  (reduce-scatter along the sequence with ``sequence_parallel``)
    Input grad:   none (integer input).
    Weight grad:  dE_r[i] = sum of de over the positions whose id is i (local, no communication),
                  the same on every device: dense (V/t, dim), or with ``single_use`` under
                  DataParallel in fp32 those rows added straight into main_grad (:class:`_VocabLookup`).
    """

    def __init__(self, vocab_size: int, dim: int, state: ParallelState, *,
                 generator: torch.Generator, init_method: InitMethod = normal_init(),
                 vocab_multiple: int = 128, dtype=torch.float32, device=None, single_use: bool = False,
                 sequence_parallel: bool = False):
        super().__init__()
        # The lookup's output as this rank's sequence positions (B, S/t, dim): reduce-scattered
        # instead of all-reduced. The head (``logits``) is unaffected.
        self.sequence_parallel = sequence_parallel and state.tp_size > 1
        if vocab_size < 1 or dim < 1 or vocab_multiple < 1:
            raise ValueError(f"VocabParallelEmbedding: vocab_size = {vocab_size}, dim = {dim} and "
                             f"vocab_multiple = {vocab_multiple} must all be >= 1")
        # The weight is used once per forward on this stage, by the lookup or by the head, not by
        # both (pp > 1): its gradient may then be accumulated straight into main_grad
        # (gradient-accumulation fusion, as the linear layers'). With both on one stage (pp = 1)
        # two backwards add to it, through the usual .grad and hook.
        self.single_use = single_use
        device = state.device if device is None else device
        multiple = vocab_multiple * state.tp_size
        self.vocab_size, self.dim = vocab_size, dim
        self.padded_vocab_size = -(-vocab_size // multiple) * multiple
        self.rows_per_rank = self.padded_vocab_size // state.tp_size
        self.vocab_start = state.tp_rank * self.rows_per_rank
        self.group, self.tp_size = state.group("tp"), state.tp_size
        # Local vocabulary columns that are padding: a suffix of the shard, possibly empty.
        self.real_rows = min(max(vocab_size - self.vocab_start, 0), self.rows_per_rank)
        self.shard_has_padding = self.real_rows < self.rows_per_rank
        # The real rows are this shard's rows of the full (vocab_size, dim) weight; padding rows are
        # zero (whatever the initialisation, a resumed run's included).
        weight = torch.empty(self.rows_per_rank, dim, dtype=dtype, device=device)   # (V/t, dim)
        weight[self.real_rows:].zero_()
        if self.real_rows:
            init_block_(weight[:self.real_rows], (vocab_size, dim), self.vocab_start, 0, generator, init_method)
        self.weight = nn.Parameter(weight)
        param_role(self.weight).tp_dim = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        e = _VocabLookup.apply(local.masked_fill(outside, 0), self.weight, self.single_use)  # (..., dim)
        # In place: e is fresh and the lookup's backward keeps the ids, not its output.
        e = e.masked_fill_(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(e, self.group)                      # (B, S/t, dim)
        return reduce_from_tp(e, self.group, in_place=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head: (..., dim) replicated -> vocab-parallel logits (..., V/t).

        logits_r = hidden E_r^T with padding columns at -inf; input grad all-reduced over tp (as
        in a column-parallel linear, overlapped with the weight grad dE_r = dlogits_r^T hidden).
        Feed the result to ``vocab_parallel_cross_entropy``.
        """
        logits = _ColumnParallelLinear.apply(hidden, self.weight, None, self.group,
                                             self.tp_size, self.single_use)          # (..., V/t)
        if not self.shard_has_padding:
            return logits
        # In place and outside autograd: the matmul's backward keeps its inputs, not its output, and
        # the gradient reaching a padding column is already 0 (softmax of -inf, never a target),
        # so recording the fill would only add a masking pass to backward. Only the padding
        # columns (a suffix of the shard) are written.
        with torch.no_grad():
            logits[..., self.real_rows:].fill_(float("-inf"))
        return logits
