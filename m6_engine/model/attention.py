"""Tensor-parallel self-attention under M6's prefix-LM mask.

With t = tp size, H heads of size hd = d / H, rank r holds heads [r H/t, (r+1) H/t):

    qkv  = ColumnParallel(x)                  x (B, S, d) -> (B, S, 3 d / t), rows (head, q|k|v, hd)
    p    = masked_softmax(q k^T, prefix_len, valid_len, scale = 1 / sqrt(hd))    (B, H/t, Sq, Sk)
    p    = dropout(p)                         model-parallel RNG stream (p is tp-sharded)
    ctx  = p v                                (B, H/t, Sq, hd) -> (B, Sq, d / t)
    out  = RowParallel(ctx)                   (B, Sq, d), all-reduced over tp

The QKV weight's rows are ordered (head, q|k|v, hd), so a contiguous tp shard holds whole heads
(Megatron's layout; ``m6_engine.convert`` permutes GPT-2's (q|k|v, head, hd) into it).
Mask (``m6_engine.ops``): query i (absolute position q_offset + i) sees key j iff
``j < valid_len and (j < prefix_len or j <= q_offset + i)``; padded query rows give zeros.

The three steps are separate methods so a KV-cache decoder can run ``project_qkv`` on new
tokens, concatenate cached keys and values, and call ``core`` with ``q_offset``.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.config import ModelConfig
from m6_engine.model.common import ParamInit
from m6_engine.parallel.layers import ColumnParallelLinear, RowParallelLinear
from m6_engine.parallel.random import RNGTracker, checkpoint
from m6_engine.parallel.state import ParallelState


class SelfAttention(nn.Module):
    """Column-parallel QKV, masked softmax (fused op or reference), row-parallel output."""

    def __init__(self, config: ModelConfig, state: ParallelState, init: ParamInit, ops,
                 prefix: str, rng_tracker: RNGTracker | None):
        super().__init__()
        self.heads_per_rank = config.num_heads // state.tp_size
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout
        self.ops, self.rng_tracker = ops, rng_tracker
        self.tp_size = state.tp_size
        d = config.hidden_size
        self.qkv = ColumnParallelLinear(d, 3 * d, state, generator=init.generator(f"{prefix}qkv.weight"),
                                        init_method=init.init_method, dtype=init.dtype, device=init.device)
        self.out = RowParallelLinear(d, d, state, generator=init.generator(f"{prefix}out.weight"),
                                     init_method=init.init_method, dtype=init.dtype, device=init.device)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, d) -> q, k, v, each (B, H/t, S, hd) for this rank's heads."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.heads_per_rank, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
        return q, k, v

    def _dropout_stream(self):
        if self.rng_tracker is not None:
            return self.rng_tracker.fork()
        if self.tp_size > 1:
            raise RuntimeError("attention dropout with tp > 1 needs the model-parallel RNG stream: "
                               "build M6Model with rng_tracker=seed_parallel_rng(seed, state)")
        return contextlib.nullcontext()

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
             valid_len: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        """Masked attention of q (B, H/t, Sq, hd) over k, v (B, H/t, Sk, hd) -> (B, H/t, Sq, hd)."""
        scores = torch.matmul(q, k.transpose(-1, -2))                                 # (B, H/t, Sq, Sk)
        probs = self.ops.masked_softmax(scores, prefix_len, valid_len, self.scale, q_offset)
        if self.training and self.dropout > 0:
            with self._dropout_stream():
                probs = F.dropout(probs, self.dropout, training=True)
        return torch.matmul(probs, v)

    def project_out(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, H/t, S, hd) -> (B, S, d), reduced over tp."""
        b, _, s, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(b, s, self.heads_per_rank * self.head_dim))

    def forward(self, x: torch.Tensor, prefix_len: torch.Tensor, valid_len: torch.Tensor,
                recompute_core: bool = False) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). ``recompute_core`` (selective activation checkpointing) keeps
        no scores / probabilities for backward: the core is rerun there, with the same dropout."""
        q, k, v = self.project_qkv(x)
        if recompute_core:
            context = checkpoint(self.core, q, k, v, prefix_len, valid_len, tracker=self.rng_tracker)
        else:
            context = self.core(q, k, v, prefix_len, valid_len)
        return self.project_out(context)
