"""Per-rank memory of an M6 training job: parameters, gradients, optimizer state, activations.

Notation: b micro-batch, s padded sequence length, h hidden, f FFN hidden, a heads, t tp size,
V the vocabulary padded for t, e bytes per activation element (2 for fp16 / bf16, 4 for fp32),
k bytes per saved dropout-mask element (1 on CUDA, whose fused dropout keeps a bool mask; e on the
CPU, which keeps a float mask), N loss tokens of a micro-batch.

**Parameters** of pipeline stage ``p``, tp rank ``r`` (``model.m6``, ``model.block``):

    per block   (3h^2 + 3h + h^2 + hf + f + fh) / t   sharded: QKV, out, FC1 (+ biases), FC2
              + h + h + 4h                             replicated: out / FC2 biases, two LayerNorms
    first stage V h / t (word) + P h (positions) + G h (segments) + F h + h (patch projection)
    last stage  2h (final LayerNorm) + V h / t when pp > 1 (the tied head's copy of the word table)

Gradients live in fp32 ``main_grad`` buffers (``parallel.data_parallel``): 4 bytes per parameter
whatever the precision. The optimizer (``optim.mixed_precision``) keeps an fp32 master (only when
the parameters are half) and two fp32 Adam moments per *owned* element: 12 (half) or 8 (fp32)
bytes per parameter, divided by dp with ZeRO-1.

**Activations** saved for backward, per micro-batch. Derived from what our autograd graph keeps
(checked against ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py), not from
process memory. One block with ``recompute="none"``:

    b s [ 4 e h              LN1 input, LN1 output (QKV input), LN2 input, LN2 output
        + 2 k h              two hidden-dropout masks (only with hidden_dropout > 0)
        + 16                 fp32 mean and rstd of both LayerNorms
        + 4 e h / t          q, k, v (matmul's contiguous copies of the head-major views),
                             context (the output projection's input)
        + 2 e f / t ]        GeLU input, FC2 input
    + b (a / t) s^2 (e + k + e)    unfused attention (ModelConfig.attention_backend): masked-softmax
                                   output (its backward needs only y), dropout mask and dropout
                                   output; just e without attention dropout
    + b (a / t) s 4 + 8 b          fused attention instead: the fp32 log-sum-exp per query row and
                                   the (B,) q_offset, no s^2 term (dropout regenerates its mask
                                   from a seed); sdpa: the same plus its boolean mask, b s^2,
                                   and its output before the heads are merged, b s e h / t

(Korthikanti et al. 2022, "Reducing Activation Recomputation": 34 s b h + 5 a s^2 b for e = 2,
k = 1, f = 4h, t = 1; ours adds the 16 bytes of LayerNorm statistics.) ``"selective"`` drops the
s^2 term (the attention core's checkpoint keeps q, k, v: the same 3 e h / t); ``"full"`` keeps
only each block's input, b s h e. Every stage also keeps prefix_len and valid_len (16 b bytes).

    first stage  b s (8 + 1 + 8 + 8)    word ids (int64, shifted into the shard), out-of-shard mask,
                                        position and segment ids
               + b s h k                embedding dropout mask
               + b n (F e + 1)          patch features and the is-patch mask (n = num_patches)
    last stage   N (2 e h + 4 V / t + 37)   gathered rows and their LayerNorm output, fp32 softmax
                                            of the vocab-parallel cross entropy, ids, masks, weights
               + 4                          the loss denominator

Under 1F1B stage ``p`` holds ``min(pp - p, m)`` micro-batches (``parallel.schedules``); sent
activations are freed after the send, so a stage's input is the only cross-stage tensor it keeps.

**Temporaries** (an estimate, not checked by tests): the backward of one block of one micro-batch
holds two attention-score-sized gradients, the received and sent boundary gradients, two FFN-sized
gradients, and, when recomputing, the recomputed activations of that block; the last stage's loss
holds the logits (e) and, for half precision, their fp32 copy: N V / t (e + 4).
"""

from dataclasses import dataclass

from m6_engine.config import ModelConfig
from m6_engine.model.m6 import stage_layer_range
from m6_engine.plan.devices import Device
from m6_engine.plan.layout import Layout, SequenceLayout

INDEX_BYTES = 8
"""int64 token / position / segment ids and lengths."""
STATS_BYTES = 4
"""fp32 LayerNorm mean and rstd, per row each."""
LSE_BYTES = 4
"""fp32 log-sum-exp of the fused attention, per query row and head."""


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class StageParameters:
    """Parameters of one tp rank of one stage, by how they are split over tp."""

    sharded: int
    """This rank's shard of tp-split weights (every tp rank holds a different one)."""
    replicated: int
    """Weights every tp rank holds in full."""
    tied_copy: int
    """The last stage's copy of the first stage's word-table shard (pp > 1), a second copy."""

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.tied_copy


def stage_parameter_split(config: ModelConfig, tp: int, pp: int, stage_id: int) -> StageParameters:
    """Parameters of one tp rank of stage ``stage_id`` (module docstring)."""
    h, f = config.hidden_size, config.ffn_size
    layers = len(stage_layer_range(config.num_layers, pp, stage_id))
    sharded = layers * (3 * h * h + 3 * h + h * h + h * f + f + f * h) // tp
    replicated = layers * (h + h + 4 * h)
    word = config.padded_vocab_size(tp) // tp * h
    tied_copy = 0
    if stage_id == 0:
        sharded += word
        replicated += config.max_text_positions * h + config.num_segments * h
        if config.num_patches:
            replicated += config.patch_feature_dim * h + h
    if stage_id == pp - 1:
        replicated += 2 * h
        tied_copy = word if pp > 1 else 0
    return StageParameters(sharded, replicated, tied_copy)


def stage_parameters(config: ModelConfig, tp: int, pp: int, stage_id: int) -> int:
    """Parameters held by one tp rank of pipeline stage ``stage_id`` (what its memory holds,
    the tied head's copy of the word table included)."""
    return stage_parameter_split(config, tp, pp, stage_id).total


def unique_parameters(config: ModelConfig, tp: int, pp: int) -> int:
    """Parameters of the whole model counted once: sharded ones summed over tp ranks, replicated
    ones once, the tied head copy not at all (equals ``model.flops.parameter_count``)."""
    splits = [stage_parameter_split(config, tp, pp, p) for p in range(pp)]
    return sum(split.sharded * tp + split.replicated for split in splits)


# --------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class ActivationDtype:
    """Bytes per element of what backward keeps: activations (e) and dropout masks (k)."""

    element: int
    mask: int

    @classmethod
    def of(cls, layout: Layout, device: Device) -> "ActivationDtype":
        e = layout.element_bytes
        return cls(element=e, mask=device.mask_bytes(e))


def block_activation_bytes(config: ModelConfig, *, tp: int, micro_batch: int, seq_length: int,
                           dtype: ActivationDtype, recompute: str) -> int:
    """Bytes one block saves for backward for one micro-batch (module docstring)."""
    b, s, h, f = micro_batch, seq_length, config.hidden_size, config.ffn_size
    e, k = dtype.element, dtype.mask
    if recompute == "full":
        return b * s * h * e
    hidden_masks = 2 * k * h if config.hidden_dropout > 0 else 0
    per_token = 4 * e * h + hidden_masks + 4 * STATS_BYTES + (4 * e * h + 2 * e * f) // tp
    total = b * s * per_token
    if recompute == "none":
        total += attention_core_bytes(config, tp=tp, micro_batch=b, seq_length=s, dtype=dtype)
    return total


def attention_backend_of(config: ModelConfig) -> str:
    """The attention core the model runs: ``auto`` is ``fused`` (the plan assumes the fused path is
    there: the built extension on CPUs, FlexAttention on GPUs), ``unfused`` with fused_kernels off."""
    if config.attention_backend == "auto":
        return "fused" if config.fused_kernels else "unfused"
    return config.attention_backend


def attention_core_bytes(config: ModelConfig, *, tp: int, micro_batch: int, seq_length: int,
                         dtype: ActivationDtype) -> int:
    """What the attention core saves beyond q, k, v and its output (module docstring)."""
    b, s, heads = micro_batch, seq_length, config.num_heads // tp
    backend = attention_backend_of(config)
    # SDPA has no CPU kernel for a mask with dropout and falls back to its math path, which keeps
    # the probabilities like the unfused core: counted so on every device (an upper bound on GPUs).
    if backend == "unfused" or (backend == "sdpa" and config.attention_dropout > 0):
        per_score = dtype.element + (dtype.mask + dtype.element if config.attention_dropout > 0 else 0)
        return b * heads * s * s * per_score
    lse = b * heads * s * LSE_BYTES + INDEX_BYTES * b          # and the (B,) q_offset
    if backend == "sdpa":
        # Its boolean (B, 1, S, S) mask, and its (B, H, S, D) output besides the heads-merged
        # copy the output projection keeps (the fused op's output already has that layout).
        return lse + b * s * s + b * s * dtype.element * config.hidden_size // tp
    return lse


def embedding_activation_bytes(config: ModelConfig, *, micro_batch: int, seq_length: int,
                               dtype: ActivationDtype) -> int:
    """Bytes the first stage's input embedding saves for one micro-batch."""
    b, s = micro_batch, seq_length
    ids = INDEX_BYTES + 1 + INDEX_BYTES + (INDEX_BYTES if config.num_segments else 0)
    total = b * s * ids
    if config.hidden_dropout > 0:
        total += b * s * config.hidden_size * dtype.mask
    if config.num_patches:
        total += b * config.num_patches * (config.patch_feature_dim * dtype.element + 1)
    return total


def head_activation_bytes(config: ModelConfig, *, tp: int, loss_tokens: int,
                          dtype: ActivationDtype) -> int:
    """Bytes the last stage's norm, head and loss save for ``loss_tokens`` tokens of a micro-batch."""
    vocab_shard = config.padded_vocab_size(tp) // tp
    per_token = (2 * INDEX_BYTES                       # row / column indices of hidden[rows]
                 + 2 * dtype.element * config.hidden_size + 2 * STATS_BYTES   # final LN in / out
                 + 4 * vocab_shard                      # fp32 softmax of the cross entropy
                 + INDEX_BYTES + 1 + 4)                 # shard-local target ids, mask, weights
    return loss_tokens * per_token + 4


def stage_activation_bytes(config: ModelConfig, *, tp: int, pp: int, stage_id: int, micro_batch: int,
                           seq_length: int, loss_tokens: int, dtype: ActivationDtype,
                           recompute: str) -> int:
    """Bytes one micro-batch's forward on stage ``stage_id`` leaves saved for its backward;
    ``loss_tokens`` is the micro-batch's total (used on the last stage only)."""
    layers = len(stage_layer_range(config.num_layers, pp, stage_id))
    total = 2 * INDEX_BYTES * micro_batch     # prefix_len, valid_len
    total += layers * block_activation_bytes(config, tp=tp, micro_batch=micro_batch,
                                             seq_length=seq_length, dtype=dtype, recompute=recompute)
    if stage_id == 0:
        total += embedding_activation_bytes(config, micro_batch=micro_batch, seq_length=seq_length,
                                            dtype=dtype)
    if stage_id == pp - 1:
        total += head_activation_bytes(config, tp=tp, loss_tokens=loss_tokens, dtype=dtype)
    return total


def in_flight_microbatches(pp: int, stage_id: int, num_microbatches: int) -> int:
    """Micro-batches whose activations stage ``stage_id`` holds at once under 1F1B."""
    return min(pp - stage_id, num_microbatches)


def temporary_bytes(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int,
                    dtype: ActivationDtype) -> int:
    """Estimated transient peak on top of the saved activations (module docstring)."""
    t, b, s = layout.tp, layout.micro_batch, seq.seq_length
    e, h = dtype.element, config.hidden_size
    # Only the unfused core makes score-sized gradients; the fused ones work tile by tile.
    scores = b * (config.num_heads // t) * s * s * e if attention_backend_of(config) == "unfused" else 0
    block = 2 * scores + 2 * b * s * h * e + 2 * b * s * config.ffn_size // t * e
    kwargs = dict(tp=t, micro_batch=b, seq_length=s, dtype=dtype)
    if layout.recompute != "none":
        block += (block_activation_bytes(config, recompute="none", **kwargs)
                  - block_activation_bytes(config, recompute=layout.recompute, **kwargs))
    if stage_id != layout.pp - 1:
        return block
    logits = b * seq.max_loss_tokens * config.padded_vocab_size(t) // t
    return max(block, logits * (e + (4 if e != 4 else 0)))


# --------------------------------------------------------------------------- one rank

@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank (tp rank 0, dp rank 0) of pipeline stage ``stage_id``."""

    stage_id: int
    layers: range
    parameters: int
    """Parameter count (elements)."""
    weights: int
    gradients: int
    optimizer: int
    in_flight: int
    """Micro-batches held under 1F1B."""
    activations: int
    """in_flight x one micro-batch's saved activations."""
    temporaries: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.temporaries


def stage_memory(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                 stage_id: int) -> StageMemory:
    """Memory of one rank of pipeline stage ``stage_id`` (the module docstring's terms)."""
    tp, pp = layout.tp, layout.pp
    params = stage_parameters(config, tp, pp, stage_id)
    half = layout.precision != "fp32"
    owned = -(-params // layout.dp) if layout.optimizer_sharding else params
    dtype = ActivationDtype.of(layout, device)
    per_microbatch = stage_activation_bytes(
        config, tp=tp, pp=pp, stage_id=stage_id, micro_batch=layout.micro_batch,
        seq_length=seq.seq_length, loss_tokens=layout.micro_batch * seq.max_loss_tokens,
        dtype=dtype, recompute=layout.recompute)
    in_flight = in_flight_microbatches(pp, stage_id, layout.num_microbatches)
    return StageMemory(
        stage_id=stage_id, layers=stage_layer_range(config.num_layers, pp, stage_id),
        parameters=params, weights=params * layout.element_bytes, gradients=4 * params,
        optimizer=owned * (12 if half else 8), in_flight=in_flight,
        activations=in_flight * per_microbatch,
        temporaries=temporary_bytes(config, layout, seq, stage_id, dtype))


def all_stages(config: ModelConfig, layout: Layout, seq: SequenceLayout,
               device: Device) -> list[StageMemory]:
    return [stage_memory(config, layout, seq, device, p) for p in range(layout.pp)]
