"""Per-step FLOPs, communication volumes, an estimated step time and MFU.

**Model FLOPs** (what MFU counts; the trainer's formula, ``model.flops.forward_flops``):
``3 x global_batch x forward_flops(sample)``, where the prefix mask makes a sample's attention
cost ``4 d A`` per layer with A the allowed query-key pairs (the causal part costs about half of
the dense S^2), only valid positions run the linears and only loss tokens the head.

**Executed FLOPs** of one micro-batch on one rank of stage p (what the GPU actually computes on the
padded micro-batch): per block ``[2 b s (4 h^2 + 2 h f) + 4 b s^2 h] / t`` forward, backward twice
that; recomputation adds one more forward of each block ("full") or of the attention core,
``4 b s^2 h / t`` ("selective"); the first stage adds the patch projection (replicated over tp,
``2 b n F h``), the last the head on the loss tokens, ``2 N h V / t`` (x3 for backward).

**Communication** per micro-batch on one rank, each all-reduce of B bytes costing a ring's
``2 (n - 1) / n x B`` per rank over an n-rank group:

    tp  per block 2 all-reduces of b s h e forward (attention and MLP outputs), 2 backward
        (the inputs of QKV and FC1), 2 more when "full" recomputation reruns the forward;
        first stage 1 (embedding), last stage 1 (head input gradient, N h e)
    pp  one b s h e activation forward and one gradient backward per stage boundary
    dp  once per step: the fp32 gradients (4 bytes per parameter) all-reduced, or with ZeRO-1
        reduce-scattered ((n - 1) / n x 4 P) then the half parameters all-gathered ((n - 1) / n x e P);
        with pp > 1 the tied word-table gradient is also summed over the first and last stage.

**Time** (an estimate from peak rates; calibrate ``CostModel`` against a measured step):
compute at ``compute_efficiency x peak x M / (M + half_rate_rows)`` with M = b s the rows of the
micro-batch's matmuls (small micro-batches leave the tensor cores underused), communication at
``comm_efficiency x bandwidth``
(tp inside a node; dp and pp inside a node only when their groups fit one), no overlap of tp or pp
communication with compute, the dp gradient reduction overlapped with the last micro-batch's
backward only (as ``parallel.data_parallel`` does). With T_p the time of one micro-batch on stage p,
non-interleaved 1F1B takes ``(m - 1) max_p T_p + sum_p T_p``; equal stages give the familiar
bubble fraction ``(pp - 1) / (m + pp - 1)``. The optimizer step streams each owned element's fp32
gradient, master and moments (read + write) and writes the parameter back. MFU = model FLOPs /
(step time x world size x peak).
"""

from dataclasses import dataclass

from m6_engine.config import ModelConfig
from m6_engine.model.flops import forward_flops
from m6_engine.model.m6 import stage_layer_range
from m6_engine.plan.devices import Device
from m6_engine.plan.layout import Layout, SequenceLayout
from m6_engine.plan.memory import stage_parameters


def model_flops_per_step(config: ModelConfig, seq: SequenceLayout, global_batch: int) -> int:
    """Model FLOPs of one optimizer step of ``global_batch`` samples shaped like ``seq``: forward
    and backward (3 x forward), prefix mask accounted for, recomputation not counted."""
    forward = forward_flops(config, prefix_len=seq.prefix_len, valid_len=seq.valid_len,
                            loss_tokens=seq.loss_tokens, image_patches=seq.image_patches)
    return 3 * global_batch * forward


@dataclass(frozen=True)
class CostModel:
    """How close to peak the job runs: the two knobs of the time estimate."""

    compute_efficiency: float = 0.5
    """Share of peak FLOP/s the model's matmuls reach (large GEMMs: 0.5-0.7 on recent GPUs)."""
    comm_efficiency: float = 0.7
    """Share of link bandwidth a collective reaches."""
    half_rate_rows: int = 512
    """Matmul rows (micro-batch x sequence) at which the compute rate is half of its large-matmul
    value."""

    def compute_rate(self, peak: float, rows: int) -> float:
        """FLOP/s reached by matmuls of ``rows`` rows on a device of ``peak`` FLOP/s."""
        return peak * self.compute_efficiency * rows / (rows + self.half_rate_rows)


def _ring_factor(n: int) -> float:
    """Bytes each rank sends per byte reduced in a ring all-reduce over n ranks."""
    return 2.0 * (n - 1) / n if n > 1 else 0.0


def stage_flops(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int) -> tuple[int, int]:
    """(forward, backward) FLOPs executed by one rank of stage ``stage_id`` per micro-batch,
    recomputation included in backward."""
    t, b, s, h, f = layout.tp, layout.micro_batch, seq.seq_length, config.hidden_size, config.ffn_size
    layers = len(stage_layer_range(config.num_layers, layout.pp, stage_id))
    core = 4 * b * s * s * h // t
    block = 2 * b * s * (4 * h * h + 2 * h * f) // t + core
    forward = layers * block
    recompute = {"none": 0, "selective": layers * core, "full": layers * block}[layout.recompute]
    backward = 2 * forward + recompute
    if stage_id == 0 and config.num_patches and seq.image_patches:
        patch = 2 * b * config.num_patches * config.patch_feature_dim * h
        forward, backward = forward + patch, backward + 2 * patch
    if stage_id == layout.pp - 1:
        head = 2 * b * seq.loss_tokens * h * (config.padded_vocab_size(t) // t)
        forward, backward = forward + head, backward + 2 * head
    return forward, backward


def tp_bytes_per_microbatch(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int) -> int:
    """Bytes one rank of stage ``stage_id`` sends for tp all-reduces per micro-batch."""
    if layout.tp == 1:
        return 0
    activation = layout.micro_batch * seq.seq_length * config.hidden_size * layout.element_bytes
    layers = len(stage_layer_range(config.num_layers, layout.pp, stage_id))
    count = layers * (6 if layout.recompute == "full" else 4) * activation
    if stage_id == 0:
        count += activation
    if stage_id == layout.pp - 1:
        count += layout.micro_batch * seq.loss_tokens * config.hidden_size * layout.element_bytes
    return int(count * _ring_factor(layout.tp))


def _bandwidth(device: Device, ranks_spanned: int, cost: CostModel) -> float:
    """Bandwidth of a group whose ranks span ``ranks_spanned`` consecutive global ranks."""
    inside = ranks_spanned <= device.gpus_per_node
    return (device.intra_node_bandwidth if inside else device.inter_node_bandwidth) * cost.comm_efficiency


@dataclass(frozen=True)
class StepEstimate:
    """One optimizer step: volumes per rank and the time estimate."""

    model_flops: int
    """Model FLOPs of the whole step (all ranks)."""
    executed_flops: int
    """FLOPs the whole job executes (padding, padded vocabulary, recomputation included)."""
    bubble_fraction: float
    """(pp - 1) / (m + pp - 1)."""
    tp_bytes: int
    """Per rank (the busiest stage), the whole step."""
    pp_bytes: int
    """Per rank of a middle stage, the whole step (activations forward + gradients backward)."""
    dp_bytes: int
    """Per rank (the largest stage), the whole step: gradient reduction + ZeRO-1 all-gather."""
    compute_s: float
    """Busiest stage's compute time over the step (no bubble)."""
    pipeline_s: float
    """1F1B time of all micro-batches: compute, tp and pp communication, bubble."""
    dp_exposed_s: float
    """Data-parallel time not hidden behind the last backward (+ ZeRO-1 all-gather, tied sum)."""
    optimizer_s: float
    step_s: float
    mfu: float
    tokens_per_s: float
    """Padded positions per second over the job."""


def _stage_time(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                cost: CostModel, stage_id: int, peak: float) -> tuple[float, float]:
    """(one micro-batch's time on stage ``stage_id``, its backward compute time)."""
    forward, backward = stage_flops(config, layout, seq, stage_id)
    rate = cost.compute_rate(peak, layout.micro_batch * seq.seq_length)
    tp_time = tp_bytes_per_microbatch(config, layout, seq, stage_id) / _bandwidth(device, layout.tp, cost)
    p2p = 0.0
    if layout.pp > 1:
        boundary = layout.micro_batch * seq.seq_length * config.hidden_size * layout.element_bytes
        sends = (stage_id > 0) + (stage_id < layout.pp - 1)
        p2p = sends * boundary / _bandwidth(device, layout.world_size, cost)
    return (forward + backward) / rate + tp_time + p2p, backward / rate


def _dp_time(config: ModelConfig, layout: Layout, device: Device, cost: CostModel, largest_params: int,
             last_backward_s: float) -> tuple[float, int]:
    """(exposed seconds, bytes per rank) of the step's data-parallel traffic."""
    dp, e = layout.dp, layout.element_bytes
    bandwidth = _bandwidth(device, layout.tp * dp, cost)
    if dp == 1:
        grad_bytes, gather_bytes = 0, 0
    elif layout.optimizer_sharding:
        grad_bytes = int(4 * largest_params * (dp - 1) / dp)
        gather_bytes = int(e * largest_params * (dp - 1) / dp)
    else:
        grad_bytes, gather_bytes = int(4 * largest_params * _ring_factor(dp)), 0
    exposed = max(0.0, grad_bytes / bandwidth - last_backward_s) + gather_bytes / bandwidth
    if layout.pp > 1:   # tied word table: a 2-rank all-reduce between first and last stage
        tied = 4 * config.padded_vocab_size(layout.tp) // layout.tp * config.hidden_size
        exposed += tied / _bandwidth(device, layout.world_size, cost)
    return exposed, grad_bytes + gather_bytes


def estimate_step(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                  cost: CostModel = CostModel()) -> StepEstimate:
    """Volumes, time and MFU of one optimizer step (module docstring)."""
    peak = device.peak(layout.precision)
    m, pp = layout.num_microbatches, layout.pp
    times = [_stage_time(config, layout, seq, device, cost, p, peak) for p in range(pp)]
    per_stage = [t for t, _ in times]
    pipeline = (m - 1) * max(per_stage) + sum(per_stage)
    flops = [stage_flops(config, layout, seq, p) for p in range(pp)]
    rate = cost.compute_rate(peak, layout.micro_batch * seq.seq_length)
    compute = max(m * (f + b) for f, b in flops) / rate
    params = [stage_parameters(config, layout.tp, pp, p) for p in range(pp)]
    dp_exposed, dp_bytes = _dp_time(config, layout, device, cost, max(params),
                                    max(b for _, b in times))
    owned = max(params) / (layout.dp if layout.optimizer_sharding else 1)
    streamed = 4 + 2 * 4 * 3 + layout.element_bytes    # grad; master, m, v read + write; param
    optimizer = owned * streamed / device.memory_bandwidth
    step = pipeline + dp_exposed + optimizer
    model = model_flops_per_step(config, seq, layout.global_batch)
    executed = layout.dp * layout.tp * m * sum(f + b for f, b in flops)
    boundary = layout.micro_batch * seq.seq_length * config.hidden_size * layout.element_bytes
    return StepEstimate(
        model_flops=model, executed_flops=executed, bubble_fraction=(pp - 1) / (m + pp - 1),
        tp_bytes=m * max(tp_bytes_per_microbatch(config, layout, seq, p) for p in range(pp)),
        pp_bytes=m * boundary * (2 if pp > 2 else 1) if pp > 1 else 0, dp_bytes=dp_bytes,
        compute_s=compute, pipeline_s=pipeline, dp_exposed_s=dp_exposed, optimizer_s=optimizer,
        step_s=step, mfu=model / (step * layout.world_size * peak),
        tokens_per_s=layout.global_batch * seq.seq_length / step)
