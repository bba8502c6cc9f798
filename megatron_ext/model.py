"""M6 on megatron-core: its ``TransformerBlock`` with our layer spec, M6's inputs and tied head.

One pipeline stage, as megatron-core builds GPT (``LanguageModule``; tensors are sequence-first):

    stage 0:     e = embedding(batch)                                 (S, B, d)
                 x_s = W_patch f_s + b_patch  for the first num_image_patches[b] slots, else E[tokens_s]
                 e_s = x_s + P[position_ids_s] + G[segment_ids_s],  dropout(hidden_dropout)
    every stage: h = decoder(e or the previous stage's h, attention_mask = prefix_lengths(prefix_len,
                 valid_len))  (megatron_ext.spec.m6_layer_spec; final LayerNorm on the last stage)
    last stage:  logits_r = h E_r^T  (S, B, V/t), padding columns of the vocabulary at -inf
                 loss_sb  = vocab_parallel_cross_entropy(logits, labels)  -> returned as (B, S)

The loss per micro-batch (:func:`masked_token_mean`) is sum(loss * loss_mask) / max(sum(loss_mask), 1),
as in our engine, so both give the same losses from the same weights (``megatron_ext.convert``).
Parameter names follow megatron-core's GPT (``embedding.word_embeddings``, ``embedding.
position_embeddings``, ``embedding.tokentype_embeddings`` for segments, ``decoder.layers.<local
index>.*``, ``decoder.final_layernorm``, ``output_layer`` on a last stage that is not the first)
plus ``embedding.patch_projection``.
"""

import functools

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from m6_engine.config import ModelConfig
from m6_engine.data.batch import MicroBatch
from megatron_ext.attention import prefix_lengths
from megatron_ext.spec import block_spec, m6_layer_spec


class M6McoreEmbedding(MegatronModule):
    """Word (vocab-parallel), position, segment and patch embeddings of stage 0 (module docstring)."""

    def __init__(self, config: TransformerConfig, model: ModelConfig, padded_vocab_size: int):
        super().__init__(config=config)
        self.model = model
        d = config.hidden_size
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=padded_vocab_size, embedding_dim=d, init_method=config.init_method,
            config=config)
        self.position_embeddings = nn.Embedding(model.max_text_positions, d, dtype=config.params_dtype)
        self.tokentype_embeddings = (nn.Embedding(model.num_segments, d, dtype=config.params_dtype)
                                     if model.num_segments else None)
        self.patch_projection = (nn.Linear(model.patch_feature_dim, d, dtype=config.params_dtype)
                                 if model.num_patches else None)
        with torch.no_grad():
            for module in (self.position_embeddings, self.tokentype_embeddings, self.patch_projection):
                if module is not None:
                    config.init_method(module.weight)
            if self.patch_projection is not None:
                self.patch_projection.bias.zero_()
        self.dropout = nn.Dropout(config.hidden_dropout)

    def _with_patches(self, x: torch.Tensor, patches: torch.Tensor, num_image_patches: torch.Tensor):
        """x (B, S, d) with its first num_image_patches[b] slots replaced by projected patches."""
        n = self.model.num_patches
        count = num_image_patches.to(x.device)                                            # (B,)
        is_patch = torch.arange(n, device=x.device).unsqueeze(0) < count.unsqueeze(1)    # (B, n)
        projected = self.patch_projection(patches.to(device=x.device, dtype=x.dtype))     # (B, n, d)
        head = torch.where(is_patch.unsqueeze(-1), projected, x[:, :n])
        return torch.cat([head, x[:, n:]], dim=1)

    def forward(self, tokens, position_ids, segment_ids=None, patches=None, num_image_patches=None):
        """(B, S) ids (and patches (B, n, F)) -> (S, B, d)."""
        x = self.word_embeddings(tokens)                                                  # (B, S, d)
        if self.patch_projection is not None and patches is not None:
            x = self._with_patches(x, patches, num_image_patches)
        x = x + self.position_embeddings(position_ids)
        if self.tokentype_embeddings is not None:
            x = x + self.tokentype_embeddings(segment_ids)
        return self.dropout(x.transpose(0, 1).contiguous())


class M6McoreModel(LanguageModule):
    """One pipeline stage of M6 built from megatron-core modules (module docstring).

    ``config`` is :func:`megatron_ext.config.transformer_config` of ``model``; the process groups
    are megatron-core's (``parallel_state.initialize_model_parallel``). ``forward`` takes the
    tensors of a collated M6 micro-batch (``m6_engine.data.tasks.collate``; see
    :func:`batch_inputs`) and returns the next stage's input, or on the last stage the per-token
    loss (B, S) when ``labels`` are given, else this rank's logits (B, S, V/t).
    """

    def __init__(self, config: TransformerConfig, model: ModelConfig, *, pre_process: bool = True,
                 post_process: bool = True, padded_vocab_size: int | None = None):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.model = model
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = True
        self.padded_vocab_size = padded_vocab_size or model.padded_vocab_size(tp)
        if self.padded_vocab_size < model.vocab_size or self.padded_vocab_size % tp:
            raise ValueError(f"padded_vocab_size = {self.padded_vocab_size} must be >= vocab_size = "
                             f"{model.vocab_size} and divisible by tp = {tp}")
        self.model_type = ModelType.encoder_or_decoder   # what megatron-core's schedules read
        if pre_process:
            self.embedding = M6McoreEmbedding(config, model, self.padded_vocab_size)
        self.decoder = TransformerBlock(config=config, spec=block_spec(config, m6_layer_spec()),
                                        pre_process=pre_process, post_process=post_process)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, config=config,
                init_method=config.init_method, bias=False, gather_output=False,
                skip_weight_param_allocation=pre_process)
            rows = self.padded_vocab_size // tp
            start = self.tp_group.rank() * rows
            pad = torch.arange(start, start + rows) >= model.vocab_size
            self.register_buffer("vocab_padding", pad, persistent=False)       # (V/t,) bool
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's activation, handed over by megatron-core's schedules."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, tokens, position_ids, prefix_len, valid_len, segment_ids=None, patches=None,
                num_image_patches=None, labels=None):
        mask = prefix_lengths(prefix_len, valid_len)
        hidden = (self.embedding(tokens, position_ids, segment_ids, patches, num_image_patches)
                  if self.pre_process else None)
        hidden = self.decoder(hidden_states=hidden, attention_mask=mask)                 # (S, B, d)
        if not self.post_process:
            return hidden
        logits, _ = self.output_layer(hidden, weight=self.shared_embedding_or_output_weight())
        logits = logits.masked_fill(self.vocab_padding.to(logits.device), float("-inf"))  # (S, B, V/t)
        if labels is None:
            return logits.transpose(0, 1)
        return self.compute_language_model_loss(labels, logits)                         # (B, S)


def batch_inputs(batch: MicroBatch, model: ModelConfig) -> dict:
    """The keyword arguments of :meth:`M6McoreModel.forward` from a collated M6 micro-batch."""
    inputs = {k: getattr(batch, k) for k in ("tokens", "position_ids", "prefix_len", "valid_len", "labels")}
    if model.num_segments:
        inputs["segment_ids"] = batch.segment_ids
    if model.num_patches and batch.patches is not None:
        inputs["patches"] = batch.patches
        inputs["num_image_patches"] = batch.num_image_patches
    return inputs


def masked_token_mean(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron-core loss function: mean loss over the loss tokens, and the value to log."""
    weights = loss_mask.to(device=per_token_loss.device, dtype=torch.float32)            # (B, S)
    loss = (per_token_loss.float() * weights).sum() / weights.sum().clamp(min=1.0)
    # A copy: the schedule divides the returned loss by num_microbatches in place.
    return loss, {"lm loss": loss.detach().clone()}


def m6_forward_step(model_config: ModelConfig):
    """The ``forward_step_func`` of ``get_forward_backward_func()`` for an M6McoreModel stage."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(next(model.parameters()).device)   # moved once, here
        output = model(**batch_inputs(batch, model_config))
        return output, functools.partial(masked_token_mean, batch.loss_mask)

    return forward_step
