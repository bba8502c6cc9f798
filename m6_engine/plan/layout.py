"""What a plan is about: the parallel layout of a job and the shape of its samples.

A :class:`Layout` is the whole cluster-side description of a training job: the mesh
(tp, pp, dp), batch sizes, activation recomputation, precision, sequence parallelism, interleaved
1F1B (virtual stages), the ZeRO stage and optimizer offload. A :class:`SequenceLayout` is one
packed sample as ``m6_engine.data.tasks`` builds it: every sample is padded to ``seq_length``
positions (what memory and executed FLOPs depend on), and only its ``valid_len`` positions,
``prefix_len`` bidirectional ones and ``loss_tokens`` predicted ones count as model FLOPs.
"""

import dataclasses
from dataclasses import dataclass

from m6_engine.config import (
    OFFLOAD_MODES, PRECISIONS, RECOMPUTE_MODES, ZERO_STAGES, ConfigError, JobConfig, ModelConfig,
)

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Layout:
    """One job's parallel layout and the training settings that change memory or time."""

    tp: int
    """Tensor-parallel size (inside a node)."""
    pp: int
    """Pipeline stages."""
    dp: int
    """Data-parallel replicas."""
    micro_batch: int
    """Samples per micro-batch on one replica."""
    global_batch: int
    """Samples per optimizer step: micro_batch * dp * num_microbatches."""
    recompute: str = "none"
    """Activation checkpointing: "none", "selective" (attention core) or "full" (whole blocks)."""
    precision: str = "bf16"
    """Parameter / activation dtype: "fp32", "fp16" or "bf16" (O2: fp32 master weights)."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (``ParallelConfig.sequence_parallel``): the hidden state
    between blocks holds S / tp positions per tp rank; needs tp > 1."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (``ParallelConfig.virtual_stages``): V > 1 is interleaved
    1F1B, which needs pp >= 2 and micro-batches per replica in whole groups of pp."""
    zero_stage: int = 0
    """``OptimizerConfig.zero_stage``: 1 shards fp32 masters and Adam moments over dp, 2 also the
    fp32 gradients, 3 also the half-precision weights (gathered layer by layer)."""
    offload: str = "none"
    """``OptimizerConfig.offload``: "cpu" keeps the fp32 masters and Adam moments in host memory
    and runs the optimizer step there (zero_stage 0, 1 or 2)."""

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "micro_batch", "global_batch", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Layout.{name} must be an integer >= 1, got {value!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"Layout.recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"Layout.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        per_round = self.micro_batch * self.dp
        if self.global_batch % per_round:
            raise ConfigError(f"Layout.global_batch = {self.global_batch} is not divisible by "
                              f"micro_batch * dp = {self.micro_batch} * {self.dp} = {per_round}")
        if not isinstance(self.sequence_parallel, bool):
            raise ConfigError(f"Layout.sequence_parallel must be a bool, got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("Layout.sequence_parallel splits the sequence over the tp ranks: it needs "
                              "tp > 1 (with tp = 1 it changes nothing; leave it off)")
        if self.virtual_stages > 1 and self.pp < 2:
            raise ConfigError(f"Layout.virtual_stages = {self.virtual_stages} (interleaved 1F1B) needs "
                              f"pp >= 2, got pp = {self.pp}")
        if self.virtual_stages > 1 and self.num_microbatches % self.pp:
            raise ConfigError(f"Layout.virtual_stages = {self.virtual_stages} (interleaved 1F1B) runs "
                              f"micro-batches in groups of pp: global_batch / (micro_batch * dp) = "
                              f"{self.num_microbatches} is not a multiple of pp = {self.pp}")
        if self.zero_stage not in ZERO_STAGES or isinstance(self.zero_stage, bool):
            raise ConfigError(f"Layout.zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage!r}")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"Layout.offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.offload != "none" and self.zero_stage == 3:
            raise ConfigError("Layout.offload = 'cpu' works with zero_stage 0, 1 or 2, not 3 (as "
                              "OptimizerConfig refuses it)")

    @classmethod
    def of_job(cls, job: JobConfig, dp: int) -> "Layout":
        """The layout ``job`` runs with ``dp`` data-parallel replicas (sequence parallelism only
        counts with tp > 1, where the engine applies it)."""
        parallel, train, opt = job.parallel, job.train, job.optimizer
        return cls(tp=parallel.tp, pp=parallel.pp, dp=dp, micro_batch=train.micro_batch,
                   global_batch=train.global_batch, recompute=train.recompute, precision=opt.precision,
                   sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
                   virtual_stages=parallel.virtual_stages, zero_stage=opt.zero_stage, offload=opt.offload)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per replica per step (gradient accumulation), ``m``."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def element_bytes(self) -> int:
        """Bytes of one parameter / activation element at this precision."""
        return ELEMENT_BYTES[self.precision]

    @property
    def owns_shards(self) -> bool:
        """True when each dp rank keeps optimizer state for its 1/dp of the elements (ZeRO >= 1)."""
        return self.zero_stage >= 1

    def check(self, config: ModelConfig, seq: "SequenceLayout | None" = None) -> None:
        """Raise ConfigError when ``config`` cannot be split this way (or, given ``seq``, when
        sequence parallelism cannot split its positions over tp)."""
        config.check_layout(self.tp, self.pp, self.virtual_stages)
        if seq is not None and self.sequence_parallel and seq.seq_length % self.tp:
            raise ConfigError(f"Layout.sequence_parallel splits the sequence over tp = {self.tp} ranks: "
                              f"seq_length = {seq.seq_length} is not divisible by {self.tp}")

    def describe(self) -> str:
        zero = f"ZeRO-{self.zero_stage}" if self.zero_stage else "no ZeRO"
        extras = [zero]
        if self.offload != "none":
            extras.append(f"optimizer offloaded to the {self.offload.upper()}")
        if self.sequence_parallel:
            extras.append("sequence parallel")
        if self.virtual_stages > 1:
            extras.append(f"interleaved 1F1B with {self.virtual_stages} virtual stages per rank")
        return (f"tp {self.tp} x pp {self.pp} x dp {self.dp} = {self.world_size} ranks, micro-batch "
                f"{self.micro_batch}, global batch {self.global_batch} ({self.num_microbatches} "
                f"micro-batches per replica), recompute {self.recompute}, {self.precision}, "
                + ", ".join(extras))


TASK_SHAPES = ("multimodal_to_text", "image_to_text", "text_denoising", "language_modelling")


@dataclass(frozen=True)
class SequenceLayout:
    """One packed sample: its padded length and what of it is real (``data.tasks`` layout)."""

    seq_length: int
    """Positions every sample is padded to: num_patches + max_text_positions (16 + 512 = 528)."""
    prefix_len: int
    """Bidirectional positions: patches + masked text."""
    valid_len: int
    """Positions that are not trailing pad."""
    loss_tokens: int
    """Positions whose next token is predicted (the complete text but its last token)."""
    image_patches: int
    """Patches that are projected (0 for text-only tasks)."""
    max_loss_tokens: int
    """Most loss tokens any sample can have: what the head's memory is planned for."""
    task: str = ""
    """The task this shape was derived from, for reports."""

    def __post_init__(self):
        if not 0 <= self.prefix_len <= self.valid_len <= self.seq_length:
            raise ConfigError(f"SequenceLayout: need 0 <= prefix_len = {self.prefix_len} <= valid_len "
                              f"= {self.valid_len} <= seq_length = {self.seq_length}")
        if not 0 <= self.loss_tokens <= self.max_loss_tokens <= self.seq_length:
            raise ConfigError(f"SequenceLayout: need 0 <= loss_tokens = {self.loss_tokens} <= "
                              f"max_loss_tokens = {self.max_loss_tokens} <= seq_length")

    @classmethod
    def for_task(cls, config: ModelConfig, task: str = "multimodal_to_text") -> "SequenceLayout":
        """The longest sample of ``task`` for this model (``data.tasks.pack``'s budgets).

        Text parts get half of ``max_text_positions`` each when both are present, all of it
        when alone; the complete text's last token predicts nothing.
        """
        n, text = config.num_patches, config.max_text_positions
        half = text // 2
        shapes = {  # task: (prefix_len, valid_len, loss_tokens, image_patches)
            "multimodal_to_text": (n + half, n + text, text - half - 1, n),
            "image_to_text": (n, n + text, text - 1, n),
            "text_denoising": (half, text, text - half - 1, 0),
            "language_modelling": (0, text, text - 1, 0),
        }
        if task not in shapes:
            raise ConfigError(f"unknown task {task!r} for a sequence layout; choose one of {TASK_SHAPES}")
        prefix, valid, loss, images = shapes[task]
        return cls(seq_length=n + text, prefix_len=prefix, valid_len=valid, loss_tokens=loss,
                   image_patches=images, max_loss_tokens=text - 1, task=task)

    def with_length(self, seq_length: int) -> "SequenceLayout":
        """The same sample padded to another length (valid and loss clipped to fit)."""
        valid = min(self.valid_len, seq_length)
        return dataclasses.replace(self, seq_length=seq_length, valid_len=valid,
                                   prefix_len=min(self.prefix_len, valid),
                                   loss_tokens=min(self.loss_tokens, seq_length),
                                   max_loss_tokens=min(self.max_loss_tokens, seq_length))

    def describe(self) -> str:
        task = f"{self.task}: " if self.task else ""
        return (f"{self.seq_length} positions ({task}prefix {self.prefix_len}, valid {self.valid_len}, "
                f"{self.loss_tokens} loss tokens, {self.image_patches} patches)")
