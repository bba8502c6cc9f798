"""megatron-core's ``TransformerConfig`` of an M6 ``ModelConfig``: the same model in its terms.

The block design matches M6's (pre-LN, bias on every linear, tanh-approximated GeLU, attention
scaled by 1 / sqrt(hd), N(0, init_std) for every weight including the output layers, dropout on
embeddings, attention probabilities and residual branches). Megatron's jit-fused bias / activation /
dropout paths and Apex / TE options are off, so the block runs with plain PyTorch apart from our
kernels; ``ModelConfig.fused_kernels`` maps to ``masked_softmax_fusion`` (our fused prefix-mask
softmax, else its reference).
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from m6_engine.config import ModelConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), M6's / GPT-2's activation."""
    return F.gelu(x, approximate="tanh")



def no_deprecated_defaults() -> dict:
    """TransformerConfig arguments that stand in for deprecated defaults of megatron-core.

    megatron-core 0.16's default ``cuda_graph_scope="full"`` warns "full scope is deprecated" in
    every TransformerConfig it builds; the empty list is the same setting without the warning.
    Versions without the field get nothing.
    """
    return {"cuda_graph_scope": []} if "cuda_graph_scope" in TransformerConfig.__dataclass_fields__ else {}

def transformer_config(model: ModelConfig, *, tp: int = 1, pp: int = 1,
                       params_dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """TransformerConfig of ``model`` split tp-way and pp-way; ``overrides`` set further fields
    (e.g. ``sequence_parallel``, ``recompute_granularity``)."""
    model.check_layout(tp, pp)
    init = init_method_normal(model.init_std)
    fields = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads, ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim, hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout, layernorm_epsilon=model.layernorm_eps,
        init_method_std=model.init_std, init_method=init, output_layer_init_method=init,
        activation_func=gelu_tanh, normalization="LayerNorm",
        masked_softmax_fusion=model.fused_kernels, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        fp16=params_dtype == torch.float16, bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**no_deprecated_defaults(), **fields, **overrides})
