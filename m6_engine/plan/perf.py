"""Per-step FLOPs, communication volumes, an estimated step time and MFU.

**Model FLOPs** (what MFU counts; the trainer's formula, ``model.flops.forward_flops``):
``3 x global_batch x forward_flops(sample)``, where the prefix mask makes a sample's attention
cost ``4 d A`` per layer with A the allowed query-key pairs (the causal part costs about half of
the dense S^2), only valid positions run the linears and only loss tokens the head.

**Executed FLOPs** of one micro-batch on one rank of stage p (what the GPU actually computes on the
padded micro-batch): per block ``[2 b s (4 h^2 + 2 h f) + 4 b s^2 h] / t`` forward, backward twice
that, over the blocks of all the rank's chunks; recomputation adds one more forward of each block
("full") or of the attention core, ``4 b s^2 h / t`` ("selective"); the first stage adds the patch
projection (replicated over tp, ``2 b n F h``), the last the head on the loss tokens,
``2 N h V / t`` (x3 for backward).

**Communication** per micro-batch on one rank, a ring all-reduce of B bytes costing
``2 (n - 1) / n x B`` per rank over an n-rank group, an all-gather or a reduce-scatter half that:

    tp  per block 2 all-reduces of b s h e forward (attention and MLP outputs), 2 backward
        (the inputs of QKV and FC1), 2 more when "full" recomputation reruns the forward;
        first stage 1 (embedding), last stage 1 (head input gradient, N h e). Sequence
        parallelism replaces each all-reduce by an all-gather and a reduce-scatter of the same
        total volume (Korthikanti et al. 2022), and adds the last stage's all-gather of the
        hidden state before the final LayerNorm, (t - 1) / t b s h e. It also gathers the QKV /
        FC1 input again in backward (it kept only its shard): 2 (t - 1) / t b s h e per block,
        launched asynchronously while dx's matmul runs (``parallel.layers``): in the volume, not
        in the time; and once per step sums the position-wise parameters' gradients over tp
        (LayerNorms, position / segment tables, patch projection: 4 bytes per owned element).
    pp  one b s' h e activation forward and one gradient backward per boundary the rank sends
        across (s' = s / t with sequence parallelism): V - [k = pp - 1] activations and
        V - [k = 0] gradients per micro-batch on rank k, V times the plain 1F1B count.
    dp  fp32 gradients (4 bytes per element of the stage's buffer, ``plan.resident``):
        ZeRO 0 all-reduced once per step; ZeRO 1 reduce-scattered once ((n - 1) / n x 4 P), then
        the half parameters all-gathered ((n - 1) / n x e P); ZeRO 2 and 3 reduce-scattered on
        every micro-batch's backward (m times per step), ZeRO 2 then all-gathers the parameters
        once; ZeRO 3 instead all-gathers each block before its forward and again before its
        backward ((n - 1) / n x e per block and direction, every micro-batch) and the root
        bucket (embedding, head) once per step. A bucket holding the tied word table (pp > 1) is
        all-reduced at the last micro-batch at every stage; with pp > 1 the tied word-table
        gradient is also summed over the first and last stage.

**Time** (an estimate from peak rates; calibrate ``CostModel`` against a measured step):
compute at ``compute_efficiency x peak x M / (M + half_rate_rows)`` with M = b s the rows of the
micro-batch's matmuls (small micro-batches leave the tensor cores underused), communication at
``comm_efficiency x bandwidth`` (tp inside a node; dp and pp inside a node only when their groups
fit one), no overlap of tp or pp communication with compute. Overlap of dp traffic:

- the once-per-step gradient reduction (ZeRO 0 / 1, whole-held tied buckets) hides behind the last
  micro-batch's backward, of one chunk only with interleaving (``no_sync`` covers every chunk until
  the step's last backward): exposed ``max(0, t_reduce - t_backward / V)``;
- ZeRO 2 / 3's per-micro-batch reduce-scatters hide behind that micro-batch's backward, and
  ZeRO 3's block gathers (prefetched one block ahead) behind the forward and backward they feed;
  they share one dp link, so each micro-batch adds to its stage's time
  ``max(0, L t_g - t_forward) + max(0, L t_g + t_rs - t_backward) + 2 V t_g`` with t_g one
  block's gather, L the rank's blocks, t_rs the micro-batch's reduce-scatters, and 2 V t_g for the
  first block of each chunk and direction, which nothing before it prefetches; the root's gather
  and the ZeRO 1 / 2 parameter all-gather after the step are exposed.

With T_p the time of one micro-batch on stage p, 1F1B takes
``m max_p T_p + (sum_p T_p - max_p T_p) / V``: equal stages give the bubble fraction
``(pp - 1) / (V m + pp - 1)`` ((pp - 1) / (V m) of the busy time; V = 1 is plain 1F1B). The
optimizer step streams each owned element's fp32 gradient, master and moments (read + write) and
writes the parameter back: ``(4 + 24 + e) U / memory_bandwidth`` on the device; offloaded, it runs
after backward, exposed: the owned gradients cross PCIe to the host (4 U), the host's AdamW reads
gradient, master and moments and writes them back and writes the half weights,
``(28 + e) U / host_memory_bandwidth``, and the half weights cross back (e U), both PCIe copies at
``comm_efficiency x pcie_bandwidth``. MFU = model FLOPs / (step time x world size x peak).
"""

from dataclasses import dataclass

from m6_engine.config import ModelConfig
from m6_engine.model.flops import forward_flops
from m6_engine.plan.devices import Device
from m6_engine.plan.layout import Layout, SequenceLayout
from m6_engine.plan.resident import ROOT, rank_layer_ranges, stage_buffer


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
    """Share of link bandwidth a collective (or a PCIe copy) reaches."""
    half_rate_rows: int = 512
    """Matmul rows (micro-batch x sequence) at which the compute rate is half of its large-matmul
    value."""

    def compute_rate(self, peak: float, rows: int) -> float:
        """FLOP/s reached by matmuls of ``rows`` rows on a device of ``peak`` FLOP/s."""
        return peak * self.compute_efficiency * rows / (rows + self.half_rate_rows)


def _ring_factor(n: int) -> float:
    """Bytes each rank sends per byte reduced in a ring all-reduce over n ranks."""
    return 2.0 * (n - 1) / n if n > 1 else 0.0


def _half_ring(n: int) -> float:
    """Bytes each rank sends per byte of an all-gather or reduce-scatter over n ranks."""
    return (n - 1) / n if n > 1 else 0.0


def _rank_layers(config: ModelConfig, layout: Layout, stage_id: int) -> int:
    return sum(len(r) for r in rank_layer_ranges(config, layout.pp, stage_id, layout.virtual_stages))


def block_flops(config: ModelConfig, layout: Layout, seq: SequenceLayout) -> tuple[int, int]:
    """(forward, backward) FLOPs one block executes per micro-batch on one rank, recomputation in
    backward."""
    t, b, s, h, f = layout.tp, layout.micro_batch, seq.seq_length, config.hidden_size, config.ffn_size
    core = 4 * b * s * s * h // t
    block = 2 * b * s * (4 * h * h + 2 * h * f) // t + core
    recompute = {"none": 0, "selective": core, "full": block}[layout.recompute]
    return block, 2 * block + recompute


def stage_flops(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int) -> tuple[int, int]:
    """(forward, backward) FLOPs executed by one rank of stage ``stage_id`` per micro-batch (all its
    chunks), recomputation included in backward."""
    t, b, h = layout.tp, layout.micro_batch, config.hidden_size
    layers = _rank_layers(config, layout, stage_id)
    block_forward, block_backward = block_flops(config, layout, seq)
    forward, backward = layers * block_forward, layers * block_backward
    if stage_id == 0 and config.num_patches and seq.image_patches:
        patch = 2 * b * config.num_patches * config.patch_feature_dim * h
        forward, backward = forward + patch, backward + 2 * patch
    if stage_id == layout.pp - 1:
        head = 2 * b * seq.loss_tokens * h * (config.padded_vocab_size(t) // t)
        forward, backward = forward + head, backward + 2 * head
    return forward, backward


def tp_traffic(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int) -> tuple[int, int]:
    """(bytes that cost time, bytes overlapped with compute) one rank of stage ``stage_id`` sends
    for tp collectives per micro-batch (module docstring: the same with and without sequence
    parallelism but for the last stage's gather; SP's backward re-gathers are the overlapped part)."""
    t = layout.tp
    if t == 1:
        return 0, 0
    activation = layout.micro_batch * seq.seq_length * config.hidden_size * layout.element_bytes
    layers = _rank_layers(config, layout, stage_id)
    reduced = layers * (6 if layout.recompute == "full" else 4) * activation
    gathered = 0
    if stage_id == 0:
        reduced += activation
    if stage_id == layout.pp - 1:
        reduced += layout.micro_batch * seq.loss_tokens * config.hidden_size * layout.element_bytes
        if layout.sequence_parallel:
            gathered += activation
    hidden = 2 * layers * activation if layout.sequence_parallel else 0
    return int(reduced * _ring_factor(t) + gathered * _half_ring(t)), int(hidden * _half_ring(t))


def tp_bytes_per_microbatch(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int) -> int:
    """Bytes one rank of stage ``stage_id`` sends for tp collectives per micro-batch (all of them)."""
    return sum(tp_traffic(config, layout, seq, stage_id))


def tp_step_bytes(config: ModelConfig, layout: Layout, seq: SequenceLayout, stage_id: int) -> int:
    """Bytes one rank of stage ``stage_id`` sends over tp in a step: every micro-batch's, and with
    sequence parallelism the once-per-step sum of the position-wise parameters' gradients (their
    elements this rank's optimizer owns, fp32)."""
    return (layout.num_microbatches * tp_bytes_per_microbatch(config, layout, seq, stage_id)
            + sequence_parallel_grad_bytes(config, layout, stage_id))


def sequence_parallel_grad_bytes(config: ModelConfig, layout: Layout, stage_id: int) -> int:
    """The once-per-step tp all-reduce of the position-wise parameters' gradients under sequence
    parallelism (``parallel.grad_sync``), bytes this rank sends."""
    if not layout.sequence_parallel:
        return 0
    buffer = stage_buffer(config, layout.tp, layout.pp, stage_id, layout.virtual_stages, layout.dp,
                          layout.zero_stage)
    return int(4 * buffer.owned_position_wise * _ring_factor(layout.tp))


def tied_grad_bytes(config: ModelConfig, layout: Layout) -> int:
    """Bytes the first and the last stage each send to sum the tied word table's fp32 gradient
    (a 2-rank all-reduce, pp > 1; ``parallel.tied``)."""
    if layout.pp == 1:
        return 0
    return int(4 * config.padded_vocab_size(layout.tp) // layout.tp * config.hidden_size * _ring_factor(2))


def _bandwidth(device: Device, ranks_spanned: int, cost: CostModel) -> float:
    """Bandwidth of a group whose ranks span ``ranks_spanned`` consecutive global ranks."""
    inside = ranks_spanned <= device.gpus_per_node
    return (device.intra_node_bandwidth if inside else device.inter_node_bandwidth) * cost.comm_efficiency


def p2p_sends(layout: Layout, stage_id: int) -> int:
    """Activations and gradients rank ``stage_id`` sends per micro-batch (module docstring)."""
    if layout.pp == 1:
        return 0
    v = layout.virtual_stages
    return (v - (stage_id == layout.pp - 1)) + (v - (stage_id == 0))


def boundary_bytes(config: ModelConfig, layout: Layout, seq: SequenceLayout) -> int:
    """One activation (or its gradient) crossing a stage boundary: b s' h e."""
    positions = seq.seq_length // layout.tp if layout.sequence_parallel else seq.seq_length
    return layout.micro_batch * positions * config.hidden_size * layout.element_bytes


@dataclass(frozen=True)
class StepEstimate:
    """One optimizer step: volumes per rank and the time estimate."""

    model_flops: int
    """Model FLOPs of the whole step (all ranks)."""
    executed_flops: int
    """FLOPs the whole job executes (padding, padded vocabulary, recomputation included)."""
    bubble_fraction: float
    """(pp - 1) / (V m + pp - 1)."""
    tp_bytes: int
    """Per rank (the busiest stage), the whole step, SP's overlapped re-gathers included."""
    pp_bytes: int
    """Per rank (the one sending most), the whole step (activations forward + gradients backward)."""
    dp_bytes: int
    """Per rank (the largest stage), the whole step: gradient reduction and parameter all-gathers."""
    compute_s: float
    """Busiest stage's compute time over the step (no bubble)."""
    pipeline_s: float
    """1F1B time of all micro-batches: compute, tp and pp communication, ZeRO-2/3 traffic not
    hidden behind it, bubble."""
    dp_exposed_s: float
    """Data-parallel time outside the pipeline: the reduction not hidden behind the last backward,
    the ZeRO-1/2 parameter all-gather, ZeRO-3's root gather, the tied sum."""
    optimizer_s: float
    """The optimizer step: on the device, or offloaded (PCIe both ways + the host's AdamW)."""
    step_s: float
    mfu: float
    tokens_per_s: float
    """Padded positions per second over the job."""
    pcie_bytes: int = 0
    """Per rank, the whole step: offloaded gradients to the host and weights back."""


@dataclass(frozen=True)
class DataParallelTraffic:
    """One stage's dp traffic of one step (module docstring), bytes per rank."""

    per_microbatch_rs: int
    """ZeRO-2/3: reduce-scatters of every micro-batch's backward."""
    end_reduce: int
    """All-reduce / reduce-scatter once, at the last micro-batch."""
    param_gather: int
    """ZeRO-1/2: after the step; ZeRO-3: the root bucket, once per step."""
    layer_gather: int
    """ZeRO-3: one block's all-gather (per block, direction and micro-batch)."""
    layers: int

    def step_bytes(self, m: int) -> int:
        return (m * self.per_microbatch_rs + self.end_reduce + self.param_gather
                + 2 * m * self.layers * self.layer_gather)


def dp_traffic(config: ModelConfig, layout: Layout, stage_id: int) -> DataParallelTraffic:
    n, e, zero = layout.dp, layout.element_bytes, layout.zero_stage
    buffer = stage_buffer(config, layout.tp, layout.pp, stage_id, layout.virtual_stages, n, zero)
    sizes = [buffer.numel(k) for k in range(len(buffer.whole))]
    whole = sum(s for s, w in zip(sizes, buffer.whole) if w or zero == 0)
    split = sum(sizes) - whole
    per_microbatch = int(4 * split * _half_ring(n)) if zero >= 2 else 0
    end = int(4 * whole * _ring_factor(n)) + (int(4 * split * _half_ring(n)) if zero == 1 else 0)
    layer_sizes = [s for s, unit in zip(sizes, buffer.units) if unit != ROOT]
    if zero == 3:
        root = sum(s for s, unit in zip(sizes, buffer.units) if unit == ROOT)
        gather = int(e * root * _half_ring(n))
        layer = int(e * max(layer_sizes, default=0) * _half_ring(n))
    else:
        gather = int(e * sum(sizes) * _half_ring(n)) if zero >= 1 else 0
        layer = 0
    return DataParallelTraffic(per_microbatch, end, gather, layer, len(layer_sizes))


def _stage_time(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                cost: CostModel, stage_id: int, peak: float) -> tuple[float, float]:
    """(one micro-batch's time on stage ``stage_id``, its backward compute time)."""
    forward, backward = stage_flops(config, layout, seq, stage_id)
    rate = cost.compute_rate(peak, layout.micro_batch * seq.seq_length)
    tp_time = tp_traffic(config, layout, seq, stage_id)[0] / _bandwidth(device, layout.tp, cost)
    p2p = p2p_sends(layout, stage_id) * boundary_bytes(config, layout, seq) / _bandwidth(
        device, layout.world_size, cost)
    dp = dp_traffic(config, layout, stage_id)
    dp_bandwidth = _bandwidth(device, layout.tp * layout.dp, cost)
    # ZeRO-2/3 traffic of this micro-batch on the dp link: the reduce-scatters and ZeRO-3's
    # backward gathers share the backward's window, the forward gathers the forward's.
    forward_link, backward_link = 0.0, dp.per_microbatch_rs / dp_bandwidth
    exposed = 0.0
    if dp.layer_gather:
        gather = dp.layer_gather / dp_bandwidth
        forward_link, backward_link = forward_link + dp.layers * gather, backward_link + dp.layers * gather
        exposed += 2 * layout.virtual_stages * gather      # each chunk's first block, both ways
    exposed += max(0.0, forward_link - forward / rate) + max(0.0, backward_link - backward / rate)
    return (forward + backward) / rate + tp_time + p2p + exposed, backward / rate


def _dp_exposed(config: ModelConfig, layout: Layout, device: Device, cost: CostModel,
                last_backward_s: float) -> tuple[float, int]:
    """(exposed seconds, bytes per rank) of the step's data-parallel traffic outside the pipeline,
    for the stage that moves the most."""
    bandwidth = _bandwidth(device, layout.tp * layout.dp, cost)
    window = last_backward_s / layout.virtual_stages
    exposed, volume = 0.0, 0
    for stage_id in range(layout.pp):
        dp = dp_traffic(config, layout, stage_id)
        stage_exposed = max(0.0, dp.end_reduce / bandwidth - window) + dp.param_gather / bandwidth
        exposed = max(exposed, stage_exposed)
        volume = max(volume, dp.step_bytes(layout.num_microbatches))
    # the tied word table's 2-rank all-reduce between first and last stage, and sequence
    # parallelism's tp sum of the position-wise parameters' gradients, both after the dp reduction
    exposed += tied_grad_bytes(config, layout) / _bandwidth(device, layout.world_size, cost)
    exposed += max(sequence_parallel_grad_bytes(config, layout, p) for p in range(layout.pp)) / _bandwidth(
        device, layout.tp, cost)
    return exposed, volume


def optimizer_time(config: ModelConfig, layout: Layout, device: Device, cost: CostModel) -> tuple[float, int]:
    """(seconds, PCIe bytes) of the optimizer step of the rank owning the most (module docstring)."""
    owned = max(stage_buffer(config, layout.tp, layout.pp, p, layout.virtual_stages, layout.dp,
                             layout.zero_stage).owned for p in range(layout.pp))
    e = layout.element_bytes
    if layout.offload == "none":
        return owned * (4 + 2 * 4 * 3 + e) / device.memory_bandwidth, 0
    pcie = owned * (4 + e)
    host = owned * (7 * 4 + e) / device.host_memory_bandwidth
    return pcie / (device.pcie_bandwidth * cost.comm_efficiency) + host, pcie


def estimate_step(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
                  cost: CostModel = CostModel()) -> StepEstimate:
    """Volumes, time and MFU of one optimizer step (module docstring)."""
    peak = device.peak(layout.precision)
    m, pp, v = layout.num_microbatches, layout.pp, layout.virtual_stages
    times = [_stage_time(config, layout, seq, device, cost, p, peak) for p in range(pp)]
    per_stage = [t for t, _ in times]
    pipeline = m * max(per_stage) + (sum(per_stage) - max(per_stage)) / v
    flops = [stage_flops(config, layout, seq, p) for p in range(pp)]
    rate = cost.compute_rate(peak, layout.micro_batch * seq.seq_length)
    compute = max(m * (f + b) for f, b in flops) / rate
    dp_exposed, dp_bytes = _dp_exposed(config, layout, device, cost, max(b for _, b in times))
    optimizer, pcie = optimizer_time(config, layout, device, cost)
    step = pipeline + dp_exposed + optimizer
    model = model_flops_per_step(config, seq, layout.global_batch)
    executed = layout.dp * layout.tp * m * sum(f + b for f, b in flops)
    boundary = boundary_bytes(config, layout, seq)
    return StepEstimate(
        model_flops=model, executed_flops=executed, bubble_fraction=(pp - 1) / (v * m + pp - 1),
        tp_bytes=max(tp_step_bytes(config, layout, seq, p) for p in range(pp)),
        pp_bytes=m * boundary * max(p2p_sends(layout, p) for p in range(pp)), dp_bytes=dp_bytes,
        compute_s=compute, pipeline_s=pipeline, dp_exposed_s=dp_exposed, optimizer_s=optimizer,
        step_s=step, mfu=model / (step * layout.world_size * peak),
        tokens_per_s=layout.global_batch * seq.seq_length / step, pcie_bytes=pcie)
