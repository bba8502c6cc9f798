"""M6's prefix-LM attention core for megatron-core's ``SelfAttention``, on our fused kernel.

megatron-core's attention calls its core as ``core(query, key, value, attention_mask, ...)`` with

    query (Sq, B, H/t, hd), key and value (Sk, B, H/t, hd)  ->  context (Sq, B, H/t * hd)

and passes ``attention_mask`` through the transformer block untouched. Here that argument is not an
(Sq, Sk) mask but M6's two integers per sample, packed by :func:`prefix_lengths` as an int64 tensor
(B, 2) = [prefix_len, valid_len]; query i sees key j iff ``j < valid_len and (j < prefix_len or
j <= i)`` (``m6_engine.ops``). The core computes

    scores = q k^T                                       (B, H/t, Sq, Sk)
    probs  = masked_softmax(scores, prefix_len, valid_len, scale = 1 / sqrt(hd))
    probs  = dropout(probs)                              Megatron's model-parallel RNG stream
    ctx    = probs v                                     (B, H/t, Sq, hd) -> (Sq, B, H/t * hd)

so no (Sq, Sk) mask tensor is built. ``TransformerConfig.masked_softmax_fusion`` chooses our fused
kernel (True) or its plain-PyTorch reference (False), as it chooses Apex's kernel in Megatron.
"""

import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from m6_engine import ops as m6_ops


def prefix_lengths(prefix_len: torch.Tensor, valid_len: torch.Tensor) -> torch.Tensor:
    """Pack the lengths (B,) as the ``attention_mask`` the core reads: (B, 2) int64."""
    if prefix_len.shape != valid_len.shape or prefix_len.dim() != 1:
        raise ValueError(f"prefix_len and valid_len must both be (B,), got {tuple(prefix_len.shape)} "
                         f"and {tuple(valid_len.shape)}")
    return torch.stack([prefix_len, valid_len], dim=1).to(torch.int64)


class PrefixMaskAttention(MegatronModule):
    """megatron-core core attention under M6's prefix-LM mask (module docstring).

    Built by ``SelfAttention`` from a layer spec with megatron-core's core-attention arguments.
    Multi-head attention only (``num_query_groups == num_attention_heads``), no context
    parallelism, no attention bias, no packed-sequence parameters.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size > 1": config.context_parallel_size > 1,
            "num_query_groups != num_attention_heads (GQA)":
                config.num_query_groups not in (None, config.num_attention_heads),
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "softmax_type != 'vanilla'": config.softmax_type != "vanilla",
            "window_size": config.window_size is not None,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"PrefixMaskAttention does not support TransformerConfig {bad}")
        tp_size = pg_collection.tp.size() if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_world_size())
        self.heads_per_rank = divide(config.num_attention_heads, tp_size)
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.ops = m6_ops.select_ops(config.masked_softmax_fusion)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("PrefixMaskAttention takes no attention_bias and no packed_seq_params")
        if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != 2:
            got = None if attention_mask is None else tuple(attention_mask.shape)
            raise ValueError("PrefixMaskAttention needs attention_mask = prefix_lengths(prefix_len, "
                             f"valid_len), an int (B, 2) tensor; got shape {got}")
        lengths = attention_mask.to(query.device)
        q = query.permute(1, 2, 0, 3)                                    # (B, H/t, Sq, hd)
        k = key.permute(1, 2, 3, 0)                                      # (B, H/t, hd, Sk)
        v = value.permute(1, 2, 0, 3)                                    # (B, H/t, Sk, hd)
        scores = torch.matmul(q, k)                                      # (B, H/t, Sq, Sk)
        probs = self.ops.masked_softmax(scores, lengths[:, 0], lengths[:, 1], self.scale)
        if self.training and self.dropout > 0:
            # probs is split over tp (heads): its dropout mask comes from the model-parallel stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = torch.nn.functional.dropout(probs, self.dropout, training=True)
        context = torch.matmul(probs, v)                                 # (B, H/t, Sq, hd)
        sq, b = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_rank * self.head_dim)
