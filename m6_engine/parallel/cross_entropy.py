"""Cross entropy over vocab-parallel logits, without gathering the full vocabulary.

Rank r of the tp group holds logits z_r (..., V/t) for vocabulary ids [r V/t, (r+1) V/t). Each
rank reduces its shard to three numbers per token: its max m_r, s_r = sum_v exp(z_rv - m_r) and
the target's logit z_y (0 on the ranks that do not hold the target). One all-gather of those
(3, ...) shares them, and every rank combines them the same way:

    M = max_r m_r,   S = sum_r s_r exp(m_r - M),   z_y = sum_r (z_y)_r
    loss = log(S) + M - z_y                         per token, fp32
    dloss/dz_r = softmax(z)_r - onehot(y)_r = e_r exp(m_r - M) / S - onehot(y)_r   (local)

with e_r = exp(z_r - m_r), which forward keeps; backward turns it into the gradient in place, so
the scaling by exp(m_r - M) / S shares backward's one scaling pass. e_r is written over the logits
when they are a fp32 copy made here (half logits) or when the caller allows it
(``overwrite_logits``: the loss path, which never reads its logits again), else into one fresh
(..., V/t) fp32 tensor. Padding columns must hold -inf (``VocabParallelEmbedding.logits`` does
this): they add nothing to s_r and get zero gradient; a shard that is all padding has m_r = -inf
and s_r = 0. Targets must be real vocabulary ids (a padding id gives an infinite loss).
"""

import torch
import torch.distributed as dist

from m6_engine.parallel.collectives import all_gather_single
from m6_engine.parallel.state import ParallelState


def _combine(m, s, target_logit, group, tp_size):
    """(M, S, z_y) of the module docstring from this rank's (m_r, s_r, (z_y)_r), each (...)."""
    if tp_size == 1:
        return m, s, target_logit
    stats = torch.stack([m, s, target_logit])                           # (3, ...)
    gathered = stats.new_empty((tp_size * 3, *stats.shape[1:]))         # (t * 3, ...), rank-major
    all_gather_single(gathered, stats, group=group)
    ms, ss, ts = gathered.view(tp_size, *stats.shape).unbind(1)         # (t, ...) each
    big_m = ms.amax(dim=0)
    return big_m, (ss * (ms - big_m).exp()).sum(dim=0), ts.sum(dim=0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, overwrite_logits):
        z = logits.float()
        m = torch.amax(z, dim=-1)                                       # (...) m_r
        local = target - vocab_start
        outside = (local < 0) | (local >= z.shape[-1])                  # target not in this shard
        local = local.masked_fill(outside, 0)
        target_logit = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        own = z is not logits or overwrite_logits                       # z may be overwritten
        exp = z if own else torch.empty_like(z)
        shift = m.masked_fill(m == float("-inf"), 0.0)                  # all-padding shard: e = 0
        torch.sub(z, shift.unsqueeze(-1), out=exp).exp_()               # (..., V/t) e_r
        tp_size = dist.get_world_size(group)   # size-1 groups skip the collective (tp = 1)
        big_m, sum_exp, target_logit = _combine(m, exp.sum(dim=-1), target_logit, group, tp_size)
        ctx.save_for_backward(exp, (shift - big_m).exp() / sum_exp, local, outside)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() + big_m - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved e (the largest tensor here) becomes the gradient in place, so a second
        # backward through a retained graph would read it modified: refuse it.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("vocab_parallel_cross_entropy: backward ran twice through the same "
                               "graph (retain_graph); recompute the loss instead")
        ctx.consumed = True
        grad, scale, local, outside = ctx.saved_tensors
        grad.mul_((grad_loss * scale).unsqueeze(-1))                    # g softmax
        hit = (~outside).to(grad.dtype) * grad_loss                     # (...)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))  # - g onehot
        return grad.detach().to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, state: ParallelState,
                                 *, overwrite_logits: bool = False) -> torch.Tensor:
    """Per-token loss (...) in fp32 from vocab-parallel logits (..., V/t) and targets (...).

    ``overwrite_logits``: the caller will not read ``logits`` again (they are the output head's
    fresh result, as on the training loss path), so fp32 logits are turned into the saved
    softmax numerator in place instead of a copy (Megatron's cross entropy always does this)."""
    if logits.dim() != target.dim() + 1 or logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits (..., V/t) and target (...) must "
                         f"share leading dims, got logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"vocab_parallel_cross_entropy: target must hold integer ids, got {target.dtype}")
    vocab_start = state.tp_rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, state.group("tp"), vocab_start,
                                            overwrite_logits)
