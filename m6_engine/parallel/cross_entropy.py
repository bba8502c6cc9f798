"""Cross entropy over vocab-parallel logits, without gathering the full vocabulary.

Rank r of the tp group holds logits z_r (..., V/t) for vocabulary ids [r V/t, (r+1) V/t).
With m = max_v z_v (all-reduce MAX), s = sum_v exp(z_v - m) and z_y = the target's logit
(one all-reduce SUM of both):

    loss = log(s) - (z_y - m)                       per token, fp32
    dloss/dz_r = softmax(z)_r - onehot(y)_r          (local: no communication in backward)

Padding columns must hold -inf (``VocabParallelEmbedding.logits`` does this): they add nothing to
s and get zero gradient. Targets must be real vocabulary ids (a padding id gives an infinite loss).
"""

import torch
import torch.distributed as dist

from m6_engine.parallel.state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start):
        z = logits.float()
        m = z.max(dim=-1).values                                        # (...)
        tp_size = dist.get_world_size(group)   # size-1 groups skip the collectives (tp = 1)
        if tp_size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = z - m.unsqueeze(-1)                                   # (..., V/t), a new tensor
        local = target - vocab_start
        outside = (local < 0) | (local >= z.shape[-1])                  # target not in this shard
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        sums = torch.stack([exp.sum(dim=-1), target_logit])             # (2, ...)
        if tp_size > 1:
            dist.all_reduce(sums, group=group)
        loss = sums[0].log() - sums[1]
        ctx.save_for_backward(exp.div_(sums[0].unsqueeze(-1)), local, outside)   # softmax
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved softmax (the largest tensor here) becomes the gradient in place, so a second
        # backward through a retained graph would read it modified: refuse it.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("vocab_parallel_cross_entropy: backward ran twice through the same "
                               "graph (retain_graph); recompute the loss instead")
        ctx.consumed = True
        grad, local, outside = ctx.saved_tensors
        hit = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 state: ParallelState) -> torch.Tensor:
    """Per-token loss (...) in fp32 from vocab-parallel logits (..., V/t) and targets (...)."""
    if logits.dim() != target.dim() + 1 or logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits (..., V/t) and target (...) must "
                         f"share leading dims, got logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"vocab_parallel_cross_entropy: target must hold integer ids, got {target.dtype}")
    vocab_start = state.tp_rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, state.group("tp"), vocab_start)
