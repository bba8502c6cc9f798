"""Layer specs (megatron-core ``ModuleSpec``) that put our kernels into megatron-core's blocks.

- :func:`m6_layer_spec`: M6's transformer layer, megatron-core's ``TransformerLayer`` with
  column / row-parallel linears, our :class:`~megatron_ext.norm.M6LayerNorm` and the prefix-LM
  core :class:`~megatron_ext.attention.PrefixMaskAttention` (the block's ``attention_mask`` is
  then ``prefix_lengths(prefix_len, valid_len)``).
- :func:`local_gpt_layer_spec`: megatron-core's own local GPT spec
  (``get_gpt_layer_local_spec``) with its two norms replaced by ``M6LayerNorm``: a drop-in for
  users without Apex, everything else unchanged.
- :func:`block_spec`: a whole block of one of them on this pipeline stage, with ``M6LayerNorm``
  also as the final norm (a bare layer spec gets megatron-core's default final norm, which is
  ``torch.nn.LayerNorm`` without Apex).
"""

import dataclasses

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.attention import PrefixMaskAttention
from megatron_ext.norm import M6LayerNorm


def m6_layer_spec() -> ModuleSpec:
    """Pre-LN layer: LN, self-attention (prefix-LM core), bias-dropout-add, LN, MLP, bias-dropout-add."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=M6LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=PrefixMaskAttention,
                    linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=M6LayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add))


def local_gpt_layer_spec(**kwargs) -> ModuleSpec:
    """``get_gpt_layer_local_spec(**kwargs)`` with ``M6LayerNorm`` as input and pre-MLP norm."""
    spec = get_gpt_layer_local_spec(**kwargs)
    if kwargs.get("normalization", "LayerNorm") not in (None, "LayerNorm"):
        raise ValueError("local_gpt_layer_spec replaces LayerNorm; RMSNorm specs have no M6 kernel")
    spec.submodules = dataclasses.replace(spec.submodules, input_layernorm=M6LayerNorm,
                                          pre_mlp_layernorm=M6LayerNorm)
    return spec


def block_spec(config: TransformerConfig, layer_spec: ModuleSpec, pp_rank: int | None = None
               ) -> TransformerBlockSubmodules:
    """This pipeline stage's layers of ``layer_spec`` and an ``M6LayerNorm`` final norm."""
    layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=M6LayerNorm)
