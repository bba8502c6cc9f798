"""Per-rank memory of an M6 training job: parameters, gradients, optimizer state, activations.

Notation: b micro-batch, s padded sequence length, h hidden, f FFN hidden, a heads, t tp size,
V the vocabulary padded for t, e bytes per activation element (2 for fp16 / bf16, 4 for fp32),
k bytes per saved dropout-mask element (1 on CUDA, whose fused dropout keeps a bool mask; e on the
CPU, which keeps a float mask), N loss tokens of a micro-batch, s' the positions of the hidden
state on a rank: s, or s / t with sequence parallelism.

**Parameters, gradients and optimizer state** per ZeRO stage, on the device or (offload) on the
host: ``plan.resident`` (its docstring has the table).

**Activations** saved for backward, per micro-batch. Derived from what our autograd graph keeps
(checked against ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py, sequence
parallelism on real tp = 2 ranks), not from process memory. One block with ``recompute="none"``:

    b s' [ 4 e h             LN1 input, LN1 output (QKV input), LN2 input, LN2 output
         + 2 k h             two hidden-dropout masks (only with hidden_dropout > 0)
         + 16 ]              fp32 mean and rstd of both LayerNorms
    + b s [ 4 e h / t        q, k, v (matmul's contiguous copies of the head-major views),
                             context (the output projection's input)
          + 2 e f / t ]      GeLU input, FC2 input
    + b (a / t) s^2 (e + k + e)    unfused attention (ModelConfig.attention_backend): masked-softmax
                                   output (its backward needs only y), dropout mask and dropout
                                   output; just e without attention dropout
    + b (a / t) s 4 + 8 b          fused attention instead: the fp32 log-sum-exp per query row and
                                   the (B,) q_offset, no s^2 term (dropout regenerates its mask
                                   from a seed); sdpa: the same plus its boolean mask, b s^2,
                                   and its output before the heads are merged, b s e h / t

With sequence parallelism (s' = s / t) the LayerNorms, residuals and dropouts run on the rank's
positions and the QKV / FC1 layers keep only their input shard (they gather it again in
backward), so every term is 1 / t of tp = 1's (tests/bench/bench_sequence_parallel.py measures
exactly that). (Korthikanti et al. 2022, "Reducing Activation Recomputation": 34 s b h + 5 a s^2 b
for e = 2, k = 1, f = 4h, t = 1; ours adds the 16 bytes of LayerNorm statistics.) ``"selective"``
drops the s^2 term (the attention core's checkpoint keeps q, k, v: the same 3 e h / t); ``"full"``
keeps only each block's input, b s' h e. Every (chunk of a) stage also keeps prefix_len and
valid_len (16 b bytes).

    first stage  b s (8 + 1 + 8 + 8)    word ids (int64, shifted into the shard), out-of-shard mask,
                                        position and segment ids (all s positions even with SP: the
                                        lookup runs on all of them before its reduce-scatter)
               + b s' h k               embedding dropout mask
               + b n' (F e + 1)         patch features and the is-patch mask of the rank's n' patch
                                        slots (n' = num_patches, or with SP those among its positions)
    last stage   N (2 e h + 4 V / t + 37)   gathered rows and their LayerNorm output, fp32 softmax
                                            of the vocab-parallel cross entropy, ids, masks, weights
               + 4                          the loss denominator (the same with SP: the hidden
                                            state is all-gathered before the final LayerNorm)

**Held micro-batches.** Under 1F1B stage ``p`` holds ``min(pp - p, m)`` micro-batches
(``parallel.schedules``); sent activations are freed after the send, so a stage's input is the only
cross-stage tensor it keeps. Interleaved 1F1B (V chunks, chunk c of rank k = virtual stage
c pp + k, its embedding / head only on virtual stage 0 / V pp - 1): rank k runs
w = min(2 (pp - k - 1) + (V - 1) pp, V m) warm-up forwards (``parallel.interleaved``), so w + 1
chunk forwards are alive at its peak (V m when w = V m). Which chunks they belong to changes
through the steady phase: after forward w + j and before backward j the rank holds, of chunk c,

    n_c(j) = F_c(w + j + 1) - F_(V-1-c)(j),   F_c(n) = pp floor(n / (pp V)) + clip(n mod (pp V) - c pp, 0, pp)

(forwards take the chunks in groups of pp, backwards in reverse), and the peak is
max_j sum_c n_c(j) A_c with A_c the chunk's bytes per micro-batch; n_c is periodic in j with
period pp V, so j < pp V is searched.

**Temporaries** (an estimate, not checked by tests): the backward of one block of one micro-batch
holds two attention-score-sized gradients, the received and sent boundary gradients (with SP the
gathered QKV / FC1 input and its gradient before the reduce-scatter), two FFN-sized gradients,
and, when recomputing, the recomputed activations of that block; the last stage's loss holds the
logits (e) and, for half precision, their fp32 copy: N V / t (e + 4).
"""

from dataclasses import dataclass

from m6_engine.config import ModelConfig
from m6_engine.model.m6 import stage_layer_range
from m6_engine.plan.devices import Device
from m6_engine.plan.layout import Layout, SequenceLayout
from m6_engine.plan.resident import (  # noqa: F401  (the planner's parameter counts live there)
    StageParameters, rank_layer_ranges, resident_state, stage_parameter_split, stage_parameters,
    unique_parameters,
)

INDEX_BYTES = 8
"""int64 token / position / segment ids and lengths."""
STATS_BYTES = 4
"""fp32 LayerNorm mean and rstd, per row each."""
LSE_BYTES = 4
"""fp32 log-sum-exp of the fused attention, per query row and head."""


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
                           dtype: ActivationDtype, recompute: str, sequence_parallel: bool = False) -> int:
    """Bytes one block saves for backward for one micro-batch (module docstring); with
    ``sequence_parallel`` the replicated per-position terms hold s / t positions."""
    b, s, h, f = micro_batch, seq_length, config.hidden_size, config.ffn_size
    e, k = dtype.element, dtype.mask
    own = s // tp if sequence_parallel else s       # positions of the hidden state on this rank
    if recompute == "full":
        return b * own * h * e
    hidden_masks = 2 * k * h if config.hidden_dropout > 0 else 0
    total = b * own * (4 * e * h + hidden_masks + 4 * STATS_BYTES) + b * s * ((4 * e * h + 2 * e * f) // tp)
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


def patch_slots(config: ModelConfig, *, seq_length: int, tp: int = 1, sequence_parallel: bool = False,
                tp_rank: int = 0) -> int:
    """Patch slots among this tp rank's positions: all num_patches, or with sequence parallelism
    those of [r s / t, (r + 1) s / t)."""
    if not sequence_parallel:
        return config.num_patches
    chunk = seq_length // tp
    return max(0, min((tp_rank + 1) * chunk, config.num_patches) - tp_rank * chunk)


def embedding_activation_bytes(config: ModelConfig, *, micro_batch: int, seq_length: int,
                               dtype: ActivationDtype, tp: int = 1, sequence_parallel: bool = False,
                               tp_rank: int = 0) -> int:
    """Bytes the first stage's input embedding saves for one micro-batch (of tp rank ``tp_rank``:
    with sequence parallelism its dropout mask and patch slots are its positions only)."""
    b, s = micro_batch, seq_length
    ids = INDEX_BYTES + 1 + INDEX_BYTES + (INDEX_BYTES if config.num_segments else 0)
    total = b * s * ids
    if config.hidden_dropout > 0:
        total += b * (s // tp if sequence_parallel else s) * config.hidden_size * dtype.mask
    if config.num_patches:
        slots = patch_slots(config, seq_length=s, tp=tp, sequence_parallel=sequence_parallel,
                            tp_rank=tp_rank)
        total += b * slots * (config.patch_feature_dim * dtype.element + 1)
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
                           seq_length: int, loss_tokens: int, dtype: ActivationDtype, recompute: str,
                           sequence_parallel: bool = False, virtual_stages: int = 1, chunk: int = 0,
                           tp_rank: int = 0) -> int:
    """Bytes one micro-batch's forward through pipeline rank ``stage_id`` (its ``chunk`` with
    interleaved 1F1B) leaves saved for its backward; ``loss_tokens`` is the micro-batch's total
    (used on the last virtual stage only)."""
    layers = len(stage_layer_range(config.num_layers, pp, stage_id, virtual_stages, chunk))
    virtual = chunk * pp + stage_id
    total = 2 * INDEX_BYTES * micro_batch     # prefix_len, valid_len
    total += layers * block_activation_bytes(config, tp=tp, micro_batch=micro_batch, seq_length=seq_length,
                                             dtype=dtype, recompute=recompute,
                                             sequence_parallel=sequence_parallel)
    if virtual == 0:
        total += embedding_activation_bytes(config, micro_batch=micro_batch, seq_length=seq_length,
                                            dtype=dtype, tp=tp, sequence_parallel=sequence_parallel,
                                            tp_rank=tp_rank)
    if virtual == pp * virtual_stages - 1:
        total += head_activation_bytes(config, tp=tp, loss_tokens=loss_tokens, dtype=dtype)
    return total


def in_flight_microbatches(pp: int, stage_id: int, num_microbatches: int) -> int:
    """Micro-batches whose activations stage ``stage_id`` holds at once under 1F1B."""
    return min(pp - stage_id, num_microbatches)


def _forwards_of_chunk(n: int, pp: int, virtual_stages: int, chunk: int) -> int:
    """Forwards of ``chunk`` among a rank's first ``n`` interleaved forwards (chunks in groups of pp)."""
    cycles, rest = divmod(n, pp * virtual_stages)
    return cycles * pp + min(max(rest - chunk * pp, 0), pp)


def interleaved_in_flight(pp: int, virtual_stages: int, num_microbatches: int, stage_id: int,
                          chunk_bytes: tuple[int, ...]) -> tuple[int, ...]:
    """Per chunk, the micro-batches whose activations rank ``stage_id`` holds at its interleaved
    1F1B peak (module docstring), for chunks saving ``chunk_bytes`` per micro-batch each."""
    v, m = virtual_stages, num_microbatches
    w = min(2 * (pp - stage_id - 1) + (v - 1) * pp, v * m)      # interleaved.warmup_forwards
    if w == v * m:
        return (m,) * v
    best, peak = None, -1
    for j in range(min(v * m - w, pp * v)):      # the alive set is periodic in j with period pp V
        counts = tuple(_forwards_of_chunk(w + j + 1, pp, v, c) - _forwards_of_chunk(j, pp, v, v - 1 - c)
                       for c in range(v))
        held = sum(n * a for n, a in zip(counts, chunk_bytes))
        if held > peak:
            best, peak = counts, held
    return best


def temporary_bytes(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int,
                    dtype: ActivationDtype) -> int:
    """Estimated transient peak on top of the saved activations (module docstring)."""
    t, b, s = layout.tp, layout.micro_batch, seq.seq_length
    e, h = dtype.element, config.hidden_size
    # Only the unfused core makes score-sized gradients; the fused ones work tile by tile.
    scores = b * (config.num_heads // t) * s * s * e if attention_backend_of(config) == "unfused" else 0
    # With sequence parallelism the gathered (B, S, d) input of QKV / FC1 and the gradient before
    # its reduce-scatter take the place of the replicated boundary tensors: the same size.
    block = 2 * scores + 2 * b * s * h * e + 2 * b * s * config.ffn_size // t * e
    kwargs = dict(tp=t, micro_batch=b, seq_length=s, dtype=dtype, sequence_parallel=layout.sequence_parallel)
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
    """Bytes on one rank (tp rank 0, dp rank 0) of pipeline rank ``stage_id``: device memory by
    term (``total``) and the host memory of an offloaded optimizer (``host``)."""

    stage_id: int
    layers: tuple[range, ...]
    """The blocks of each of its chunks (one range without interleaving)."""
    parameters: int
    """Parameter count (elements)."""
    weights: int
    """Stored parameters (ZeRO-3: this rank's shards)."""
    gathered: int
    """ZeRO-3: parameters gathered at once inside a step (root bucket and two layers)."""
    gradients: int
    """fp32 gradients held between steps (ZeRO-2/3: shards, and a tied bucket whole)."""
    staging: int
    """ZeRO-2/3: full-size bucket gradients alive during backward (a bound)."""
    optimizer: int
    """fp32 masters and Adam moments on the device (0 with offload)."""
    in_flight: int
    """Micro-batch forwards whose activations are held at the peak (chunk forwards with V > 1)."""
    activations: int
    """The held micro-batches' saved activations."""
    temporaries: int
    host: int = 0
    """Host memory of the offloaded optimizer (state and pinned buffers); not in ``total``."""

    @property
    def total(self) -> int:
        """Device bytes at the peak: every term but ``host``."""
        return (self.weights + self.gathered + self.gradients + self.staging + self.optimizer
                + self.activations + self.temporaries)

    @property
    def measured_terms(self) -> int:
        """What a CPU rehearsal measures (``plan.measure``): everything but the temporaries."""
        return self.total - self.temporaries


def microbatch_activations(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                           stage_id: int, *, loss_tokens: int | None = None, tp_rank: int = 0
                           ) -> tuple[int, ...]:
    """Saved bytes of one micro-batch's forward through each chunk of pipeline rank ``stage_id``;
    ``loss_tokens`` of the micro-batch (default: micro_batch x the longest sample's)."""
    if loss_tokens is None:
        loss_tokens = layout.micro_batch * seq.max_loss_tokens
    return tuple(stage_activation_bytes(
        config, tp=layout.tp, pp=layout.pp, stage_id=stage_id, micro_batch=layout.micro_batch,
        seq_length=seq.seq_length, loss_tokens=loss_tokens, dtype=ActivationDtype.of(layout, device),
        recompute=layout.recompute, sequence_parallel=layout.sequence_parallel,
        virtual_stages=layout.virtual_stages, chunk=c, tp_rank=tp_rank)
        for c in range(layout.virtual_stages))


def held_activations(layout: Layout, stage_id: int, chunk_bytes: tuple[int, ...]) -> tuple[int, int]:
    """(micro-batch forwards held, their bytes) at the schedule's peak on rank ``stage_id``:
    ``min(pp - k, m)`` of the stage under 1F1B, the interleaved composition with V > 1."""
    if layout.virtual_stages == 1:
        held = in_flight_microbatches(layout.pp, stage_id, layout.num_microbatches)
        return held, held * chunk_bytes[0]
    counts = interleaved_in_flight(layout.pp, layout.virtual_stages, layout.num_microbatches, stage_id,
                                   chunk_bytes)
    return sum(counts), sum(n * a for n, a in zip(counts, chunk_bytes))


def stage_memory(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                 stage_id: int) -> StageMemory:
    """Memory of one rank of pipeline rank ``stage_id`` (the module docstring's terms)."""
    state = resident_state(config, tp=layout.tp, pp=layout.pp, stage_id=stage_id,
                           virtual_stages=layout.virtual_stages, dp=layout.dp, zero_stage=layout.zero_stage,
                           offload=layout.offload, element_bytes=layout.element_bytes)
    in_flight, activations = held_activations(
        layout, stage_id, microbatch_activations(config, layout, seq, device, stage_id))
    return StageMemory(
        stage_id=stage_id, layers=tuple(rank_layer_ranges(config, layout.pp, stage_id, layout.virtual_stages)),
        parameters=state.parameters, weights=state.weights, gathered=state.gathered,
        gradients=state.gradients, staging=state.staging, optimizer=state.optimizer,
        in_flight=in_flight, activations=activations,
        temporaries=temporary_bytes(config, layout, seq, stage_id, ActivationDtype.of(layout, device)),
        host=state.host)


def all_stages(config: ModelConfig, layout: Layout, seq: SequenceLayout,
               device: Device) -> list[StageMemory]:
    return [stage_memory(config, layout, seq, device, p) for p in range(layout.pp)]
