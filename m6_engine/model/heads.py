"""Finetuning heads on M6's last stage: image-text matching (paper 4.1.1, appendix A.2).

The matching head is a binary classifier on the final hidden state (after the final LayerNorm)
at the *last valid position* of an image-text matching sample. That sample is all prefix
(``m6_engine.data.tasks.image_text_matching``: ``[patches][text][SEP]``, ``prefix_len =
valid_len``), so position ``valid_len - 1`` attends to every patch and every text token: it is
M6's pooled view of the pair, as BERT's [CLS] is, but at the end, where a prefix-LM also ends a
causal text. Per micro-batch, over the M matching samples ``m`` (rows ``b_m``, labels ``y_m``):

    z_m    = final_ln(h[b_m, valid_len[b_m] - 1])                 (M, d)
    logits = z W^T + c,   W (2, d), c (2,)                        (M, 2)
    loss_m = cross_entropy(logits_m, y_m)                         (M,) fp32

The weight is replicated on the tensor-parallel group, not split: with two outputs a
column-parallel split would give one class per rank at tp = 2 and none at tp > 2, and the
(2, d) matmul is nothing next to a transformer block. The final hidden state is already
replicated over tp (the blocks end in row-parallel all-reduces), so every tp rank computes the
same logits and the same weight gradient without any communication, and the gradient into ``h``
is the full one on each rank, as the blocks' backward expects. The global norm counts the
replicated weight once (tp rank 0, ``m6_engine.optim.clip``).

Its parameters are named ``itm_head.proj.weight`` / ``.bias`` (:data:`MATCHING_HEAD_PREFIX`) and
drawn from the global name like every M6 weight, so every layout starts from the same head; a
pretrained checkpoint lacks them and ``train.init_from`` leaves them freshly initialised.
"""

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.model.common import ParamInit, ReplicatedLinear

MATCHING_HEAD = "itm_head"
"""Attribute of M6Model holding the matching head (so the global names start with it)."""
MATCHING_HEAD_PREFIX = MATCHING_HEAD + "."
NUM_MATCH_CLASSES = 2
"""0: the text was substituted, 1: the image's own text."""


class MatchingHead(nn.Module):
    """(M, d) normalised hidden states -> (M, 2) logits; see the module docstring."""

    def __init__(self, hidden_size: int, init: ParamInit):
        super().__init__()
        self.proj = ReplicatedLinear(hidden_size, NUM_MATCH_CLASSES, init, MATCHING_HEAD_PREFIX + "proj")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


def last_valid_states(hidden: torch.Tensor, valid_len: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden (B, S, d), valid_len (B,), rows (M,) sample indices -> (M, d): each sample's hidden
    state at position ``valid_len - 1``."""
    return hidden[rows, valid_len[rows] - 1]


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (M, 2), labels (M,) in {0, 1} -> (per-sample cross entropy (M,) fp32, number of
    correct argmax predictions, a detached fp32 scalar)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    correct = (logits.detach().argmax(dim=-1) == labels).sum().to(torch.float32)
    return loss, correct
