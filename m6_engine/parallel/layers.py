"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

``t`` is the tensor-parallel size and ``r`` this rank's index in the tp group. Weights follow
``torch.nn.functional.linear``: W has shape (out, in) and y = x W^T + b.

A sharded parameter carries ``param.tensor_parallel_dim`` (the dim it is split along, in rank
order); parameters without it are replicated across tp and get identical gradients on every tp
rank by construction, so they need no tp reduction. Each layer draws its master weight from the
generator it is given (see ``m6_engine.parallel.init``), so its full weight is the same for every
tp; biases start at zero.
"""

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.parallel.init import InitMethod, master_weight, normal_init
from m6_engine.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from m6_engine.parallel.state import ParallelState


def _divide(n: int, t: int, what: str) -> int:
    if n % t:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {t}")
    return n // t


def _shard(master: torch.Tensor, dim: int, state: ParallelState, dtype, device) -> nn.Parameter:
    """This tp rank's contiguous chunk of ``master`` along ``dim``, as a parameter."""
    chunk = master.shape[dim] // state.tp_size
    part = master.narrow(dim, state.tp_rank * chunk, chunk)
    param = nn.Parameter(part.to(dtype=dtype, device=device, copy=True).contiguous())
    param.tensor_parallel_dim = dim
    return param


def _bias(size: int, dtype, device, sharded: bool) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
    if sharded:
        param.tensor_parallel_dim = 0
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output dim: W_r (out/t, in), b_r (out/t,).

    Shapes:       x (..., in) replicated on the tp group -> y_r (..., out/t), or with
                  ``gather_output`` the full y (..., out).
    Forward:      y_r = x W_r^T + b_r                          (no communication)
    Input grad:   dx = all-reduce_tp(dy_r W_r)                 (copy_to_tp's backward)
    Weight grad:  dW_r = dy_r^T x,  db_r = sum(dy_r)           (local, no communication)
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, *,
                 generator: torch.Generator, bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod = normal_init(), dtype=torch.float32, device=None):
        super().__init__()
        device = state.device if device is None else device
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = _divide(out_features, state.tp_size, "ColumnParallelLinear out_features")
        self.gather_output = gather_output
        self.group = state.group("tp")
        master = master_weight((out_features, in_features), generator, init_method)
        self.weight = _shard(master, 0, state, dtype, device)   # (out/t, in)
        self.bias = _bias(self.out_per_rank, dtype, device, sharded=True) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)   # (..., out/t)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input dim: W_r (out, in/t); b (out,) replicated.

    Shapes:       x_r (..., in/t) (``input_is_parallel``) or the full x (..., in), which is then
                  split -> y (..., out), replicated on the tp group.
    Forward:      y = all-reduce_tp(x_r W_r^T) + b
    Input grad:   dx_r = dy W_r                                (local; all-gathered if x was full)
    Weight grad:  dW_r = dy^T x_r,  db = sum(dy)               (local, no communication)
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, *,
                 generator: torch.Generator, bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod = normal_init(), dtype=torch.float32, device=None):
        super().__init__()
        device = state.device if device is None else device
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _divide(in_features, state.tp_size, "RowParallelLinear in_features")
        self.input_is_parallel = input_is_parallel
        self.group = state.group("tp")
        master = master_weight((out_features, in_features), generator, init_method)
        self.weight = _shard(master, 1, state, dtype, device)   # (out, in/t)
        self.bias = _bias(out_features, dtype, device, sharded=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)                          # (..., in/t)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)      # (..., out)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Word embedding split along the vocabulary: rank r holds rows [r V/t, (r+1) V/t).

    The vocabulary is padded up to V = a multiple of ``vocab_multiple * t`` (Megatron's rule, so
    every shard has the same, aligned size). Real rows are drawn from the generator; padding rows
    are zero and are never predicted: :meth:`logits` sets their columns to -inf.

    Shapes:       ids (...) int, replicated on the tp group -> (..., dim), replicated.
    Forward:      e = all-reduce_tp(E_r[ids - r V/t] masked to zero where ids are not in shard r)
    Input grad:   none (integer input).
    Weight grad:  dE_r[i] = sum of de over the positions whose id is i (local, no communication).
    """

    def __init__(self, vocab_size: int, dim: int, state: ParallelState, *,
                 generator: torch.Generator, init_method: InitMethod = normal_init(),
                 vocab_multiple: int = 128, dtype=torch.float32, device=None):
        super().__init__()
        if vocab_size < 1 or dim < 1 or vocab_multiple < 1:
            raise ValueError(f"VocabParallelEmbedding: vocab_size = {vocab_size}, dim = {dim} and "
                             f"vocab_multiple = {vocab_multiple} must all be >= 1")
        device = state.device if device is None else device
        multiple = vocab_multiple * state.tp_size
        self.vocab_size, self.dim = vocab_size, dim
        self.padded_vocab_size = -(-vocab_size // multiple) * multiple
        self.rows_per_rank = self.padded_vocab_size // state.tp_size
        self.vocab_start = state.tp_rank * self.rows_per_rank
        self.group = state.group("tp")
        master = torch.zeros(self.padded_vocab_size, dim)
        master[:vocab_size] = master_weight((vocab_size, dim), generator, init_method)
        self.weight = _shard(master, 0, state, dtype, device)   # (V/t, dim)
        # Local vocabulary columns that are padding: a suffix of the shard, possibly empty.
        real_here = min(max(vocab_size - self.vocab_start, 0), self.rows_per_rank)
        pad = torch.arange(self.rows_per_rank, device=device) >= real_here
        self.register_buffer("padding_mask", pad, persistent=False)   # (V/t,) bool
        self.shard_has_padding = real_here < self.rows_per_rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        e = F.embedding(local.masked_fill(outside, 0), self.weight)      # (..., dim)
        e = e.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(e, self.group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head: (..., dim) replicated -> vocab-parallel logits (..., V/t).

        logits_r = hidden E_r^T with padding columns at -inf; input grad all-reduced over tp
        (copy_to_tp), weight grad dE_r = dlogits_r^T hidden. Feed the result to
        ``vocab_parallel_cross_entropy``.
        """
        logits = F.linear(copy_to_tp(hidden, self.group), self.weight)   # (..., V/t)
        if not self.shard_has_padding:
            return logits
        # In place and outside autograd: the matmul's backward keeps its inputs, not its output, and
        # the gradient reaching a padding column is already 0 (softmax of -inf, never a target),
        # so recording the fill would only add a masking pass to backward.
        with torch.no_grad():
            logits.masked_fill_(self.padding_mask, float("-inf"))
        return logits
