"""M6 (paper 3.2): embeddings, tensor-parallel blocks, pipeline stages, tied head, FLOPs.

``M6Model(config, state, ...)`` is one pipeline stage (or one model chunk of it; ``StageChunks`` a
rank's chunks under interleaved 1F1B); ``ForwardStep`` its ``forward_step`` for
``m6_engine.parallel.schedules``; ``heads`` the finetuning heads (image-text matching); ``flops``
holds the parameter and FLOP formulas.
"""

from m6_engine.model.attention import LayerKVCache, SelfAttention
from m6_engine.model.block import RECOMPUTE_MODES, TransformerBlock, check_recompute
from m6_engine.model.embeddings import WORD_EMBEDDING, M6Embeddings
from m6_engine.model.flops import allowed_pairs, batch_forward_flops, forward_flops, parameter_count
from m6_engine.model.heads import MATCHING_HEAD_PREFIX, MatchingHead
from m6_engine.model.m6 import ForwardStep, M6Loss, M6Model, StageChunks, stage_layer_range
from m6_engine.model.mlp import MLP

__all__ = [
    "ForwardStep", "LayerKVCache", "M6Embeddings", "M6Loss", "M6Model", "MATCHING_HEAD_PREFIX", "MLP",
    "MatchingHead",
    "RECOMPUTE_MODES", "SelfAttention", "StageChunks",
    "TransformerBlock", "WORD_EMBEDDING", "allowed_pairs", "batch_forward_flops", "check_recompute",
    "forward_flops",
    "parameter_count", "stage_layer_range",
]
