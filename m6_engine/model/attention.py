"""Tensor-parallel self-attention under M6's prefix-LM mask.

With t = tp size, H heads of size hd = d / H, rank r holds heads [r H/t, (r+1) H/t):

    qkv  = ColumnParallel(x)                  x (B, S, d) -> (B, S, 3 d / t), rows (head, q|k|v, hd)
    p    = masked_softmax(q k^T, prefix_len, valid_len, scale = 1 / sqrt(hd))    (B, H/t, Sq, Sk)
    p    = dropout(p)                         model-parallel RNG stream (p is tp-sharded)
    ctx  = p v                                (B, H/t, Sq, hd) -> (B, Sq, d / t)
    out  = RowParallel(ctx)                   (B, Sq, d), all-reduced over tp

With sequence parallelism x and out hold this rank's S/t positions: QKV all-gathers x, the
output layer reduce-scatters (``parallel.layers``); the core sees the whole sequence.

The three middle lines are the "unfused" attention backend (ModelConfig.attention_backend), kept as
the reference; "fused" (the default where it exists) computes them in one op that keeps nothing of
size Sq x Sk (``m6_engine.ops.prefix_lm_attention``, dropout inside it from the same stream), and
"sdpa" with torch's scaled_dot_product_attention and the boolean mask.

The QKV weight's rows are ordered (head, q|k|v, hd), so a contiguous tp shard holds whole heads
(Megatron's layout; ``m6_engine.convert`` permutes GPT-2's (q|k|v, head, hd) into it).
Mask (``m6_engine.ops``): query i of sample b (absolute position q_offset[b] + i) sees key j iff
``j < valid_len and (j < prefix_len or j <= q_offset + i)``; padded query rows give zeros.

With a :class:`LayerKVCache` (decoding and scoring, ``m6_engine.inference.kv_cache``) the same
forward runs on new tokens after cached ones: their keys and values are written into the cache,
the queries attend every cached slot up to ``valid_len``, and ``q_offset`` is each row's cursor
(the new tokens' first position). Training passes no cache: q_offset = 0, keys = the queries' own.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.config import ModelConfig
from m6_engine.model.common import ParamInit
from m6_engine.parallel.layers import ColumnParallelLinear, RowParallelLinear
from m6_engine.parallel.random import RNGTracker, checkpoint
from m6_engine.parallel.state import ParallelState


@dataclass(frozen=True)
class LayerKVCache:
    """One block's keys and values of the earlier positions, for one forward step.

    ``keys``, ``values`` (B, H/t, capacity, hd) are the cache's storage for this block (written in
    place); the step's T tokens of row b sit at positions ``start[b] .. start[b] + T - 1`` (``start``
    (B,) int64: the row's cursor), and the step attends the first ``attended`` slots (at least
    every row's valid_len: slots past it get probability 0).
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: torch.Tensor
    attended: int

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's k, v (B, H/t, T, hd) at their slots; return the attended keys and
        values, (B, H/t, attended, hd) each."""
        b, _, t, _ = k.shape
        rows = torch.arange(b, device=k.device).view(b, 1)                     # (B, 1)
        slots = self.start.view(b, 1) + torch.arange(t, device=k.device)       # (B, T)
        # Advanced indices on dims 0 and 2 with a slice between them: the indexed view is
        # (B, T, H/t, hd), the broadcast index dims first.
        self.keys[rows, :, slots] = k.transpose(1, 2)
        self.values[rows, :, slots] = v.transpose(1, 2)
        return self.keys[:, :, :self.attended], self.values[:, :, :self.attended]


class SelfAttention(nn.Module):
    """Column-parallel QKV, the attention core of the model's backend, row-parallel output."""

    def __init__(self, config: ModelConfig, state: ParallelState, init: ParamInit, ops,
                 prefix: str, rng_tracker: RNGTracker | None, *, sequence_parallel: bool = False):
        super().__init__()
        self.heads_per_rank = config.num_heads // state.tp_size
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout
        self.ops, self.rng_tracker = ops, rng_tracker
        self.tp_size = state.tp_size
        d = config.hidden_size
        self.qkv = ColumnParallelLinear(d, 3 * d, state, generator=init.generator(f"{prefix}qkv.weight"),
                                        init_method=init.init_method, dtype=init.dtype, device=init.device,
                                        sequence_parallel=sequence_parallel)
        self.out = RowParallelLinear(d, d, state, generator=init.generator(f"{prefix}out.weight"),
                                     init_method=init.init_method, dtype=init.dtype, device=init.device,
                                     sequence_parallel=sequence_parallel)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, d) -> q, k, v, each (B, H/t, S, hd) for this rank's heads (with sequence
        parallelism x holds S/t positions; the QKV layer gathers all S)."""
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.heads_per_rank, 3, self.head_dim)
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
             valid_len: torch.Tensor, q_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Masked attention of q (B, H/t, Sq, hd) over k, v (B, H/t, Sk, hd) -> (B, H/t, Sq, hd);
        query i of row b at position q_offset (int, or (B,) per row) + i."""
        dropout = self.dropout if self.training else 0.0
        if self.ops.attention is not None:  # fused / sdpa: one op, dropout inside it
            with self._dropout_stream() if dropout > 0 else contextlib.nullcontext():
                return self.ops.attention(q, k, v, prefix_len, valid_len, scale=self.scale, q_offset=q_offset,
                                          dropout_p=dropout)
        scores = torch.matmul(q, k.transpose(-1, -2))                                 # (B, H/t, Sq, Sk)
        probs = self.ops.masked_softmax(scores, prefix_len, valid_len, self.scale, q_offset)
        if dropout > 0:
            with self._dropout_stream():
                probs = F.dropout(probs, dropout, training=True)
        return torch.matmul(probs, v)

    def project_out(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, H/t, S, hd) -> (B, S, d), reduced over tp."""
        b, _, s, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(b, s, self.heads_per_rank * self.head_dim))

    def forward(self, x: torch.Tensor, prefix_len: torch.Tensor, valid_len: torch.Tensor,
                recompute_core: bool = False, cache: LayerKVCache | None = None) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). ``recompute_core`` (selective activation checkpointing) keeps
        no scores / probabilities for backward: the core is rerun there, with the same dropout.
        ``cache``: x holds new tokens after the cached positions (module docstring); the lengths
        are then absolute positions in the cache."""
        q, k, v = self.project_qkv(x)
        q_offset = 0
        if cache is not None:
            k, v = cache.append(k, v)
            q_offset = cache.start
        if recompute_core:
            context = checkpoint(self.core, q, k, v, prefix_len, valid_len, q_offset, tracker=self.rng_tracker)
        else:
            context = self.core(q, k, v, prefix_len, valid_len, q_offset)
        return self.project_out(context)
