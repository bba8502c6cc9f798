"""Global gradient norm over every tp / pp (/ dp) rank, counting each parameter once, and clipping.

The model is spread over ranks with some parameters held more than once:

- a parameter without a tp dim (``param_role(p).tp_dim`` None: LayerNorm weights, row-parallel
  biases, position embeddings) is replicated over tp with identical gradients: only tp rank 0 counts it;
- a tied weight (``tied_across_stages``: the word embedding and its copy as the output head on
  the last stage) has, after the embedding-group sum, the same gradient on both stages: only the
  first stage counts it;
- without optimizer sharding every dp rank holds the same (dp-mean) gradients, so the norm is
  reduced over the model-parallel group "mp" only; with ZeRO-1 each dp rank holds a disjoint
  shard and the sum runs over "dp" too.

    ||g|| = sqrt( sum over ranks r, counted tensors t of r : ||g_t||^2 )

A non-finite gradient on any rank (all tensors are checked, counted or not) makes the result
non-finite on every rank, which is how every rank agrees to skip a step.
"""

import math

import torch
import torch.distributed as dist

from m6_engine.parallel.roles import param_role
from m6_engine.parallel.state import ParallelState


def counts_in_norm(param: torch.Tensor, state: ParallelState) -> bool:
    """True when this rank's copy of ``param`` is the one the global norm counts (see module doc)."""
    role = param_role(param)
    if role.tied_across_stages and not state.is_first_stage:
        return False
    return role.tp_dim is not None or state.tp_rank == 0


def global_grad_norm(grads: list[torch.Tensor], counted: list[bool], state: ParallelState, *,
                     sharded: bool) -> tuple[float, bool]:
    """(global 2-norm, whether any gradient on any rank is non-finite); collective on "mp"
    (and "dp" when ``sharded``): every rank of those groups must call it.

    ``grads`` are this rank's fp32 gradient tensors (any shapes), ``counted[i]`` whether
    ``grads[i]`` enters the norm. One all-reduce per group of [sum of squares, non-finite count],
    in float64 so a large sum of squares does not overflow. The norm is NaN when non-finite.
    """
    if len(grads) != len(counted):
        raise ValueError(f"{len(grads)} gradients but {len(counted)} counted flags")
    packed = torch.zeros(2, dtype=torch.float64, device=state.device)
    if grads:
        # fp32 per-tensor norms (as torch's clip_grad_norm_; float64 ones cost 8x on the CPU),
        # combined in float64.
        norms = torch.stack(torch._foreach_norm(grads)).double()          # (n,)
        mask = torch.tensor(counted, dtype=torch.bool, device=norms.device)
        packed[0] = norms.masked_fill(~mask, 0.0).square().sum()
        packed[1] = (~torch.isfinite(norms)).sum()
    dist.all_reduce(packed, group=state.group("mp"))
    if sharded:
        dist.all_reduce(packed, group=state.group("dp"))
    sum_squares, non_finite = packed.tolist()
    if non_finite > 0:
        return float("nan"), True
    return math.sqrt(sum_squares), False


def clip_coefficient(max_norm: float, total_norm: float) -> float:
    """min(1, max_norm / (total_norm + 1e-6)) (Megatron's rule); 1.0 when ``max_norm`` is 0 (off)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: float) -> float:
    """Scale ``grads`` in place by :func:`clip_coefficient` when that is below 1; returns the
    factor applied (1.0 when none)."""
    coefficient = clip_coefficient(max_norm, total_norm)
    if coefficient >= 1.0:
        return 1.0
    if grads:
        torch._foreach_mul_(grads, coefficient)
    return coefficient
