"""One pre-LN transformer block (GPT-2 / Megatron order) and its activation checkpointing.

    h = h + dropout(attention(LN1(h), prefix_len, valid_len))
    h = h + dropout(mlp(LN2(h)))

h (B, S, d) is replicated over tp; the two dropouts act on replicated tensors and draw from the
default RNG stream. With sequence parallelism (``sequence_parallel``, tp > 1) h holds this tp
rank's positions, (B, S/t, d): the LayerNorms, dropouts and residual adds run on S/t positions,
the QKV and FC1 layers all-gather their input and the output and FC2 layers reduce-scatter theirs
(``parallel.layers``), and the dropouts draw from the model-parallel stream. Decoding and scoring run this same forward on new tokens with a
``LayerKVCache`` (``m6_engine.model.attention``), in eval mode. Parameter names below ``layers.<global index>.``: ``ln1``, ``attention.qkv``,
``attention.out``, ``ln2``, ``mlp.fc1``, ``mlp.fc2`` (``.weight`` / ``.bias``).

Recomputation (``recompute``): ``"none"`` keeps every activation; ``"selective"`` reruns only the
attention core (scores, softmax, dropout, context: the S^2-sized activations) in backward;
``"full"`` keeps only each block's input and reruns the whole block. Both replay the RNG streams
(``m6_engine.parallel.random.checkpoint``), so gradients equal those of ``"none"``.
"""

import torch
from torch import nn

from m6_engine.config import ConfigError, ModelConfig
from m6_engine.model.attention import LayerKVCache, SelfAttention
from m6_engine.model.common import LayerNorm, ParamInit, sequence_dropout
from m6_engine.model.mlp import MLP
from m6_engine.parallel.random import RNGTracker, checkpoint
from m6_engine.parallel.roles import mark_sequence_parallel
from m6_engine.parallel.state import ParallelState

RECOMPUTE_MODES = ("none", "selective", "full")


def check_recompute(mode: str) -> str:
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    return mode


class TransformerBlock(nn.Module):
    """LN, self-attention, residual, LN, MLP, residual; ``prefix`` is ``layers.<i>.``."""

    def __init__(self, config: ModelConfig, state: ParallelState, init: ParamInit, ops,
                 prefix: str, rng_tracker: RNGTracker | None, sequence_parallel: bool = False):
        super().__init__()
        self.dropout = config.hidden_dropout
        self.rng_tracker = rng_tracker
        self.sequence_parallel = sequence_parallel and state.tp_size > 1
        self.ln1 = LayerNorm(config.hidden_size, config.layernorm_eps, ops, init)
        self.attention = SelfAttention(config, state, init, ops, f"{prefix}attention.", rng_tracker,
                                       sequence_parallel=self.sequence_parallel)
        self.ln2 = LayerNorm(config.hidden_size, config.layernorm_eps, ops, init)
        self.mlp = MLP(config, state, init, f"{prefix}mlp.", sequence_parallel=self.sequence_parallel)
        if self.sequence_parallel:
            mark_sequence_parallel([*self.ln1.parameters(), *self.ln2.parameters()])

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return sequence_dropout(x, self.dropout, self.training, self.rng_tracker, self.sequence_parallel)

    def forward(self, h: torch.Tensor, prefix_len: torch.Tensor, valid_len: torch.Tensor,
                recompute_core: bool = False, cache: LayerKVCache | None = None) -> torch.Tensor:
        if cache is not None and self.sequence_parallel:
            raise RuntimeError("KV-cache decoding runs without sequence parallelism: build the "
                               "inference model with sequence_parallel=False")
        a = self.attention(self.ln1(h), prefix_len, valid_len, recompute_core, cache)
        h = h + self._dropout(a)
        return h + self._dropout(self.mlp(self.ln2(h)))


def run_blocks(blocks, h: torch.Tensor, prefix_len: torch.Tensor, valid_len: torch.Tensor,
               recompute: str, rng_tracker: RNGTracker | None) -> torch.Tensor:
    """Apply ``blocks`` in order under the recomputation mode; h (B, S, d) -> (B, S, d)."""
    for block in blocks:
        if recompute == "full" and torch.is_grad_enabled():
            h = checkpoint(block, h, prefix_len, valid_len, tracker=rng_tracker)
        else:
            h = block(h, prefix_len, valid_len, recompute == "selective" and torch.is_grad_enabled())
    return h
