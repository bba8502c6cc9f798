"""Typed configuration of m6-engine, parsed once at the edge.

Only ``examples/*.py`` and ``python -m`` entry points read YAML or argv (through
:func:`load_yaml` and :func:`apply_overrides`); everything below receives these dataclasses.
"""

import dataclasses
from dataclasses import dataclass
import types
import typing
from typing import Any

import torch

# The paper's input layout (appendix A.1): a 4x4 grid of 2048-d ResNet-50 patch features, 512
# text positions (256 masked + 256 complete when both parts are present).
NUM_PATCHES = 16
PATCH_FEATURE_DIM = 2048
BERT_CHINESE_VOCAB_SIZE = 21128


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# ModelConfig.attention_backend's choices (m6_engine.ops.attention resolves them per device).
ATTENTION_BACKENDS = ("auto", "fused", "unfused", "sdpa")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one M6 model (paper table 3 and appendix A.1)."""

    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """d_model."""
    num_heads: int
    """Attention heads; must divide hidden_size."""
    ffn_hidden_size: int = 0
    """Hidden size of the MLP; 0 means 4 * hidden_size."""
    vocab_size: int = BERT_CHINESE_VOCAB_SIZE
    """Word vocabulary (bert-base-chinese: 21128); padded up for tensor parallelism."""
    max_text_positions: int = 512
    """Learned position embeddings; text positions restart at 0 in each text part."""
    num_patches: int = NUM_PATCHES
    """Image patches per sample (4x4 grid); 0 means a text-only model (no patch projection)."""
    patch_feature_dim: int = PATCH_FEATURE_DIM
    """Dimension of one patch feature before its projection to hidden_size."""
    num_segments: int = 3
    """Segment embeddings: image, masked text, complete text; 0 means none (e.g. an imported GPT-2)."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and after attention / MLP outputs."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the N(0, std) initialisation (paper 3.5)."""
    vocab_multiple: int = 128
    """The padded vocabulary is a multiple of vocab_multiple * tp (Megatron's rule)."""
    fused_kernels: bool = True
    """Run the m6:: fused ops; False takes the plain-PyTorch reference path on purpose."""
    attention_backend: str = "auto"
    """The attention core: "fused" (m6::prefix_lm_attention on the CPU, FlexAttention with a block
    mask from the lengths on CUDA; nothing S x S kept for backward), "sdpa" (torch's
    scaled_dot_product_attention with the boolean mask), "unfused" (matmul, masked softmax,
    matmul: the reference path, keeps the (B, H, S, S) probabilities), or "auto": fused where it
    exists, unfused with fused_kernels=False. The model logs which it runs."""
    itm_head: bool = False
    """Build the image-text matching head (a replicated Linear(hidden_size, 2) on the last stage,
    ``m6_engine.model.heads``) that the ``image_text_matching`` finetuning task trains."""

    @property
    def ffn_size(self) -> int:
        """The MLP hidden size actually used."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_text_positions",
                     "patch_feature_dim", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_patches", "num_segments", "ffn_hidden_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"ModelConfig.num_heads = {self.num_heads} must divide "
                              f"ModelConfig.hidden_size = {self.hidden_size}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"ModelConfig.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("layernorm_eps", "init_std"):    # the LayerNorm op and the N(0, std) init take them as is
            if not getattr(self, name) > 0:
                raise ConfigError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_segments not in (0,) and self.num_segments < 3:
            raise ConfigError(f"ModelConfig.num_segments must be 0 (no segment embedding) or >= 3 (M6 "
                              f"samples use segments 0 image, 1 masked text, 2 complete text), "
                              f"got {self.num_segments}")

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of vocab_multiple * tp; padded rows are never predicted."""
        multiple = self.vocab_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_layout(self, tp: int, pp: int, virtual_stages: int = 1):
        """Raise ConfigError naming the field when this model cannot be split tp-way and pp-way
        (into pp * virtual_stages stages of at least one layer under interleaved 1F1B)."""
        if self.hidden_size % tp:
            raise ConfigError(f"ModelConfig.hidden_size = {self.hidden_size} is not divisible by tp = {tp}")
        if self.num_heads % tp:
            raise ConfigError(f"ModelConfig.num_heads = {self.num_heads} is not divisible by tp = {tp}")
        if self.ffn_size % tp:
            raise ConfigError(f"ModelConfig.ffn_hidden_size = {self.ffn_size} is not divisible by tp = {tp}")
        if self.num_layers < pp:
            raise ConfigError(f"ModelConfig.num_layers = {self.num_layers} is fewer than pp = {pp} "
                              "pipeline stages")
        if self.num_layers < pp * virtual_stages:
            raise ConfigError(f"ModelConfig.num_layers = {self.num_layers} is fewer than pp * "
                              f"ParallelConfig.virtual_stages = {pp} * {virtual_stages} = "
                              f"{pp * virtual_stages} virtual pipeline stages")


PRESETS = {
    # Small enough for CPU tests and the multi-process demo; still the real vocabulary.
    "tiny": dict(num_layers=4, hidden_size=128, num_heads=4, max_text_positions=128),
    # Paper table 3.
    "m6-base": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "m6-large": dict(num_layers=50, hidden_size=4096, num_heads=128),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a named preset (tiny, m6-base, m6-large) with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out: the mesh ("pp", "dp", "tp"), tp fastest; dp = world / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    schedule: str = "1f1b"
    """Pipeline schedule: "1f1b" or "gpipe"."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank: V >= 2 runs the interleaved 1F1B schedule (virtual stage
    c * pp + k on pp rank k), whose bubble is (pp - 1) / (V * m) of a step instead of (pp - 1) / m.
    Needs schedule "1f1b" and pp > 1."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: LayerNorms, dropouts and the embeddings' output hold S / tp
    positions per tp rank (all-gather before column-parallel inputs, reduce-scatter after
    row-parallel outputs), cutting those activations by tp. A no-op at tp = 1."""
    timeout_s: float = 600.0
    """Process-group timeout, so a rank that never arrives fails the job instead of hanging it."""

    def __post_init__(self):
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ParallelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"ParallelConfig.schedule must be '1f1b' or 'gpipe', got {self.schedule!r}")
        if self.virtual_stages < 1:
            raise ConfigError(f"ParallelConfig.virtual_stages must be >= 1, got {self.virtual_stages}")
        if self.virtual_stages > 1 and (self.schedule != "1f1b" or self.pp < 2):
            raise ConfigError(f"ParallelConfig.virtual_stages = {self.virtual_stages} (interleaved 1F1B) "
                              f"needs schedule '1f1b' and pp >= 2, got schedule {self.schedule!r}, "
                              f"pp = {self.pp}")
        if self.timeout_s <= 0:
            raise ConfigError(f"ParallelConfig.timeout_s must be > 0, got {self.timeout_s}")


def _coerce(value: str, kind: type, where: str):
    """Convert a command-line string to a scalar type (bool, int, float or str)."""
    if kind is str:
        return value
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} expects a boolean, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{where} expects {kind.__name__}, got {value!r}") from None


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_value(value, hint, where: str):
    """``value`` (from YAML or the command line) as a field of type ``hint``, or ConfigError naming
    ``where``, the value and the expected type.

    Strings are converted as on the command line (``_coerce``); otherwise an int is accepted where
    a float is expected, a bool is never an int or a float, a tuple field takes a list or tuple of
    the right length (or a comma-separated string) checked element by element, a dict field a mapping.
    """
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):   # X | None: None, or a valid X
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        if len(args) == 1:
            return check_value(value, args[0], where)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise ConfigError(f"{where} expects {_type_name(hint)}, got {value!r}")
        return tuple(check_value(v, a, f"{where}[{i}]") for i, (v, a) in
                     enumerate(zip(value, args or [Any] * len(value))))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a mapping, got {value!r}")
        args = typing.get_args(hint)
        if not args:
            return value
        return {check_value(k, args[0], f"{where} key"): check_value(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if hint is Any:
        return value
    if isinstance(value, str):
        return _coerce(value, hint, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} expects a boolean, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} expects int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} expects float, got {value!r}")
        return float(value)
    if hint is str:
        raise ConfigError(f"{where} expects str, got {value!r}")
    return value


def _checked_fields(cls, values: dict, section: str | None = None) -> dict:
    """``values`` of fields of the dataclass ``cls`` checked and converted by :func:`check_value`;
    an unknown field is a ConfigError listing the fields."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"section {section!r}: " if section else ""
    out = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{prefix}{cls.__name__} has no field {key!r}; fields: {sorted(names)}")
        where = f"{section}.{key}: {cls.__name__}.{key}" if section else f"{cls.__name__}.{key}"
        out[key] = check_value(value, hints[key], where)
    return out


def apply_overrides(config, overrides: dict[str, Any], section: str | None = None):
    """Return a copy of a config dataclass with fields replaced; unknown fields are an error.

    Every value is checked against the field's annotation (:func:`check_value`); strings (from the
    command line or YAML) are converted to the field's type.
    """
    return dataclasses.replace(config, **_checked_fields(type(config), overrides, section))


def load_yaml(path: str) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping top level is a clear error."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def model_config_from_dict(data: dict, section: str | None = None) -> ModelConfig:
    """ModelConfig from a mapping with an optional ``preset`` key and field overrides (each value
    checked by :func:`check_value`)."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{section + '.' if section else 'ModelConfig '}preset expects one of "
                              f"{sorted(PRESETS)}, got {preset!r}")
        return apply_overrides(model_preset(preset), data, section)
    data = _checked_fields(ModelConfig, data, section)
    try:
        return ModelConfig(**data)
    except TypeError as error:
        raise ConfigError(f"{'section ' + repr(section) + ': ' if section else ''}ModelConfig: {error}") from None



RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: batch sizes, length, logging, evaluation, checkpoints, profiling."""

    train_steps: int = 100
    """Optimizer steps of the whole run (also the length of the LR schedule)."""
    micro_batch: int = 4
    """Samples per micro-batch on one data-parallel replica."""
    global_batch: int = 16
    """Samples per optimizer step over all replicas: micro_batch * dp * gradient-accumulation steps."""
    recompute: str = "none"
    """Activation checkpointing: "none", "selective" (attention core) or "full" (whole blocks)."""
    seed: int = 1234
    """Seeds weights, dropout streams and the data order."""
    log_interval: int = 10
    """Steps between console lines / TensorBoard scalars."""
    eval_interval: int = 0
    """Steps between evaluations on the held-out set; 0 disables evaluation."""
    eval_iters: int = 2
    """Global batches per evaluation."""
    save_dir: str = ""
    """Folder of checkpoints; empty disables saving."""
    save_interval: int = 0
    """Steps between checkpoints (and one at the end); 0 saves only at the end when save_dir is set."""
    keep_last: int = 0
    """Complete checkpoints to keep (older ones are deleted); 0 keeps all."""
    async_save: bool = False
    """Write checkpoints in the background (``checkpoint.async_save``): the step that saves waits
    only while the state is copied into host memory (one copy of it, kept for the run), and the
    next save or the end of the run waits for the write; false: the step waits for the whole write."""
    load: str = ""
    """"auto" (the latest complete checkpoint in save_dir, if any), a checkpoint folder, or empty."""
    init_from: str = ""
    """Finetuning: a checkpoint folder (or directory: its latest) whose model weights, resharded to
    this layout, start the run, with a fresh optimizer, LR schedule, step 0 and data position; a
    matching head it lacks starts fresh. A checkpoint that ``load`` resumes from wins over it."""
    tensorboard_dir: str = ""
    """Folder of TensorBoard event files; empty disables TensorBoard."""
    profile_steps: str = ""
    """"a:b": write a torch.profiler trace of steps a..b-1 (TensorBoard opens it); empty disables."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0 looks it up (GPUs) or measures a matmul (CPU)."""
    prefetch: int = 2
    """Micro-batches a background thread builds ahead of the step (``data.prefetch``; pinned on a
    GPU); 0 builds each one inline. The data wait per step is logged either way."""

    def __post_init__(self):
        for name in ("train_steps", "micro_batch", "global_batch", "log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "save_interval", "keep_last", "peak_tflops", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"TrainConfig.recompute must be one of {RECOMPUTE_MODES}, "
                              f"got {self.recompute!r}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"TrainConfig.global_batch = {self.global_batch} is not divisible by "
                              f"TrainConfig.micro_batch = {self.micro_batch}")
        if self.profile_steps:
            self.profile_range()

    def profile_range(self) -> range:
        """Steps to profile, from ``profile_steps`` "a:b" (empty range when disabled)."""
        if not self.profile_steps:
            return range(0)
        try:
            start, stop = (int(x) for x in self.profile_steps.split(":"))
        except ValueError:
            raise ConfigError(f"TrainConfig.profile_steps must be 'a:b' with integers a < b, "
                              f"got {self.profile_steps!r}") from None
        if not 1 <= start < stop:
            raise ConfigError(f"TrainConfig.profile_steps must be 'a:b' with 1 <= a < b, "
                              f"got {self.profile_steps!r}")
        return range(start, stop)

    def num_microbatches(self, dp: int) -> int:
        """Gradient-accumulation steps: global_batch / (micro_batch * dp), which must be whole."""
        per_step = self.micro_batch * dp
        if self.global_batch % per_step:
            raise ConfigError(f"TrainConfig.global_batch = {self.global_batch} is not divisible by "
                              f"micro_batch * dp = {self.micro_batch} * {dp} = {per_step}")
        return self.global_batch // per_step



PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAM_BACKENDS = ("auto", "apex", "torch")
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_MODES = ("none", "cpu")


@dataclass(frozen=True)
class OptimizerConfig:
    """How parameters are updated: AdamW on fp32 master weights of half-precision parameters."""

    lr: float = 1.5e-4
    """Peak learning rate, reached at the end of the warm-up (paper: 1.5e-4)."""
    min_lr: float = 1.5e-5
    """Floor the cosine decay ends at, and the rate after the last scheduled step."""
    warmup_fraction: float = 0.01
    """Share of the scheduled steps spent in linear warm-up (paper: 1%)."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay of matrices; vectors (biases, norm weights) get none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates (paper: 0.9, 0.999)."""
    eps: float = 1e-8
    """Adam's denominator epsilon (paper: 1e-8)."""
    clip_grad: float = 1.0
    """Largest global gradient 2-norm; gradients above it are scaled down. 0 disables clipping."""
    precision: str = "fp32"
    """dtype of the model parameters: "fp32", "fp16" (dynamic loss scaling) or "bf16"."""
    initial_loss_scale: float = 2.0 ** 32
    """fp16 only: the loss scale of the first step."""
    loss_scale_growth_interval: int = 1000
    """fp16 only: clean steps after which the scale doubles."""
    loss_scale_hysteresis: int = 2
    """fp16 only: overflowing steps (since the last growth) before the scale starts to halve."""
    min_loss_scale: float = 1.0
    """fp16 only: the scale never drops below this."""
    zero_stage: int = 0
    """ZeRO over the dp ranks. 0: every rank holds everything; 1: each rank keeps the fp32 master
    weights and Adam moments of its shard only; 2: also only its shard of the fp32 gradients
    (reduce-scattered as backward produces them); 3: also only its shard of the half-precision
    weights, each layer's gathered just before it runs."""
    optimizer_sharding: bool | None = None
    """Older spelling of ``zero_stage: 1``, read once: true raises stage 0 to 1, false with a stage
    >= 1 is a contradiction. Always None after construction (code reads ``zero_stage``), so
    ``dataclasses.replace`` of the stage is never overridden by a stale alias."""
    offload: str = "none"
    """ZeRO-Offload: "cpu" keeps fp32 masters and Adam moments in host memory and runs the step
    there (the fused CPU op m6::adamw_step_); gradients stream to the host as their buckets finish
    reducing, the updated weights come back. Works with zero_stage 0, 1 and 2."""
    adam_backend: str = "auto"
    """"auto" (Apex FusedAdam when importable and on CUDA, else torch), "apex" or "torch"."""

    def __post_init__(self):
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"OptimizerConfig.zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage!r}")
        if self.optimizer_sharding is not None:   # the alias; frozen, hence object.__setattr__
            if not self.optimizer_sharding and self.zero_stage >= 1:
                raise ConfigError(f"OptimizerConfig: optimizer_sharding = false contradicts "
                                  f"zero_stage = {self.zero_stage}; give zero_stage alone")
            if self.optimizer_sharding and self.zero_stage == 0:
                object.__setattr__(self, "zero_stage", 1)
            object.__setattr__(self, "optimizer_sharding", None)
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"OptimizerConfig.offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.offload != "none" and self.zero_stage == 3:
            raise ConfigError("OptimizerConfig.offload = 'cpu' works with zero_stage 0, 1 or 2, not 3 "
                              "(stage 3's just-in-time weight gathers would then cross the host link "
                              "every layer)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"OptimizerConfig.precision must be one of {sorted(PRECISIONS)}, "
                              f"got {self.precision!r}")
        if self.adam_backend not in ADAM_BACKENDS:
            raise ConfigError(f"OptimizerConfig.adam_backend must be one of {ADAM_BACKENDS}, "
                              f"got {self.adam_backend!r}")
        if not self.lr > 0:
            raise ConfigError(f"OptimizerConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"OptimizerConfig.min_lr must be in [0, lr = {self.lr}], got {self.min_lr}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"OptimizerConfig.warmup_fraction must be in [0, 1], "
                              f"got {self.warmup_fraction}")
        if self.weight_decay < 0 or self.clip_grad < 0 or not self.eps > 0:
            raise ConfigError(f"OptimizerConfig.weight_decay = {self.weight_decay} and clip_grad = "
                              f"{self.clip_grad} must be >= 0 and eps = {self.eps} > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.min_loss_scale >= 1 or self.initial_loss_scale < self.min_loss_scale:
            raise ConfigError(f"OptimizerConfig: need 1 <= min_loss_scale = {self.min_loss_scale} <= "
                              f"initial_loss_scale = {self.initial_loss_scale}")
        if self.loss_scale_growth_interval < 1 or self.loss_scale_hysteresis < 1:
            raise ConfigError(f"OptimizerConfig.loss_scale_growth_interval = "
                              f"{self.loss_scale_growth_interval} and loss_scale_hysteresis = "
                              f"{self.loss_scale_hysteresis} must be >= 1")

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype the model's parameters must have for this precision."""
        return PRECISIONS[self.precision]

EXHAUSTED_MODES = ("wrap", "stop")


@dataclass(frozen=True)
class DataConfig:
    """Where the preprocessed data is and how tasks mix (m6_engine.data.dataset reads it)."""

    corpus: str = ""
    """Training corpus prefix written by ``python -m m6_engine.data.preprocess``."""
    corpora: Any = ()
    """A weighted blend of training corpora instead of ``corpus``: a list of ``{path, weight,
    name}`` mappings, or Megatron's ``--data-path`` form ``"W1 PREFIX1 W2 PREFIX2"``
    (``m6_engine.data.dataset.parse_corpora``); the samples of each are logged as ``samples/<name>``."""
    eval_corpus: str = ""
    """Held-out corpus prefix for evaluation; empty disables evaluation."""
    vocab_file: str = ""
    """BERT vocab.txt; empty means the default bert-base-chinese vocab of ``make install``."""
    task_weights: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "text_denoising": 1.0, "language_modelling": 1.0, "image_to_text": 1.0, "multimodal_to_text": 1.0})
    """Relative frequency of each task (``m6_engine.data.tasks.ALL_TASKS``: the four pretraining
    tasks and ``image_text_matching``); 0 or absent disables a task, so a single task finetunes."""
    exhausted: str = "wrap"
    """When a source runs out: "wrap" (new reshuffled epoch) or "stop" (end the run cleanly)."""

    def training_corpora(self) -> dict[str, str]:
        """{where it is configured: prefix} of every training corpus (``corpus`` or ``corpora[i]``)."""
        if self.corpora:
            return {f"corpora[{i}]": c["path"] for i, c in enumerate(self.corpora)}
        return {"corpus": self.corpus} if self.corpus else {}

    def __post_init__(self):
        from m6_engine.data.tasks import check_task_weights

        try:
            check_task_weights(dict(self.task_weights))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"DataConfig.task_weights: {error}") from None
        if self.exhausted not in EXHAUSTED_MODES:
            raise ConfigError(f"DataConfig.exhausted must be one of {EXHAUSTED_MODES}, got {self.exhausted!r}")
        if self.corpora:
            from m6_engine.data.dataset import DatasetError, parse_corpora

            if self.corpus:
                raise ConfigError("data.corpus and data.corpora are both set: give one prefix or a blend, not both")
            try:   # plain mappings, so the config round-trips through checkpoints as data
                blend = [dataclasses.asdict(c) for c in parse_corpora(self.corpora, "data.corpora")]
            except DatasetError as error:
                raise ConfigError(str(error)) from None
            object.__setattr__(self, "corpora", tuple(blend))


@dataclass(frozen=True)
class JobConfig:
    """Everything one training job is: the sections of a YAML config file."""

    model: ModelConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self):
        if self.data.task_weights.get("image_text_matching", 0) > 0 and not self.model.itm_head:
            raise ConfigError("data.task_weights gives image_text_matching a weight but the model "
                              "has no matching head: set model.itm_head: true")

    def to_dict(self) -> dict:
        """Plain nested dict (what checkpoints record and ``job_config_from_dict`` reads back)."""
        out = dataclasses.asdict(self)
        out["optimizer"]["betas"] = list(self.optimizer.betas)
        return out


SECTIONS = ("model", "parallel", "optimizer", "train", "data")


def _section(cls, data: dict, name: str):
    data = _checked_fields(cls, data, name)
    try:
        return cls(**data)
    except TypeError as error:
        raise ConfigError(f"section {name!r}: {error}") from None


def job_config_from_dict(data: dict, overrides: dict[str, str] | None = None) -> JobConfig:
    """JobConfig from a mapping of sections (a YAML file) and ``section.field=value`` overrides."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; sections are {list(SECTIONS)}")
    for name in SECTIONS:
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise ConfigError(f"config section {name!r} must be a mapping of field: value, "
                              f"got {data[name]!r}")
    sections = {name: dict(data.get(name) or {}) for name in SECTIONS}
    job = JobConfig(
        model=model_config_from_dict(sections["model"] or {"preset": "tiny"}, "model"),
        parallel=_section(ParallelConfig, sections["parallel"], "parallel"),
        optimizer=_section(OptimizerConfig, sections["optimizer"], "optimizer"),
        train=_section(TrainConfig, sections["train"], "train"),
        data=_section(DataConfig, sections["data"], "data"))
    by_section: dict[str, dict] = {}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"override {key!r} must be section.field with section one of {list(SECTIONS)}")
        by_section.setdefault(section, {})[name] = value
    return dataclasses.replace(job, **{
        section: apply_overrides(getattr(job, section), values, section)
        for section, values in by_section.items()})


__all__ = [
    "BERT_CHINESE_VOCAB_SIZE", "ConfigError", "DataConfig", "JobConfig", "ModelConfig", "NUM_PATCHES", "OptimizerConfig", "PATCH_FEATURE_DIM",
    "PRESETS", "ParallelConfig", "RECOMPUTE_MODES", "TrainConfig", "apply_overrides", "load_yaml", "model_config_from_dict",
    "model_preset", "job_config_from_dict", "check_value",
]
