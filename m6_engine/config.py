"""Typed configuration of m6-engine, parsed once at the edge.

Only ``examples/*.py`` and ``python -m`` entry points read YAML or argv (through
:func:`load_yaml` and :func:`apply_overrides`); everything below receives these dataclasses.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

# The paper's input layout (appendix A.1): a 4x4 grid of 2048-d ResNet-50 patch features, 512
# text positions (256 masked + 256 complete when both parts are present).
NUM_PATCHES = 16
PATCH_FEATURE_DIM = 2048
BERT_CHINESE_VOCAB_SIZE = 21128


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


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
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of vocab_multiple * tp; padded rows are never predicted."""
        multiple = self.vocab_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_layout(self, tp: int, pp: int):
        """Raise ConfigError naming the field when this model cannot be split tp-way and pp-way."""
        if self.hidden_size % tp:
            raise ConfigError(f"ModelConfig.hidden_size = {self.hidden_size} is not divisible by tp = {tp}")
        if self.num_heads % tp:
            raise ConfigError(f"ModelConfig.num_heads = {self.num_heads} is not divisible by tp = {tp}")
        if self.ffn_size % tp:
            raise ConfigError(f"ModelConfig.ffn_hidden_size = {self.ffn_size} is not divisible by tp = {tp}")
        if self.num_layers < pp:
            raise ConfigError(f"ModelConfig.num_layers = {self.num_layers} is fewer than pp = {pp} "
                              "pipeline stages")


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
    timeout_s: float = 600.0
    """Process-group timeout, so a rank that never arrives fails the job instead of hanging it."""

    def __post_init__(self):
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ParallelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"ParallelConfig.schedule must be '1f1b' or 'gpipe', got {self.schedule!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"ParallelConfig.timeout_s must be > 0, got {self.timeout_s}")


def _coerce(value: str, kind: type, where: str):
    """Convert a command-line string to the field's type (bool, int or float)."""
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


def apply_overrides(config, overrides: dict[str, Any]):
    """Return a copy of a config dataclass with fields replaced; unknown fields are an error.

    String values (from the command line) are converted to the field's current type.
    """
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"{type(config).__name__} has no field {key!r}; fields: {sorted(names)}")
        current = getattr(config, key)
        if isinstance(value, str) and not isinstance(current, str):
            value = _coerce(value, type(current), f"{type(config).__name__}.{key}")
        changes[key] = value
    return dataclasses.replace(config, **changes)


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


def model_config_from_dict(data: dict) -> ModelConfig:
    """ModelConfig from a mapping with an optional ``preset`` key and field overrides."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        return apply_overrides(model_preset(preset), data)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"ModelConfig has no field(s) {unknown}")
    try:
        return ModelConfig(**data)
    except TypeError as error:
        raise ConfigError(f"ModelConfig: {error}") from None


__all__ = [
    "BERT_CHINESE_VOCAB_SIZE", "ConfigError", "ModelConfig", "NUM_PATCHES", "PATCH_FEATURE_DIM",
    "PRESETS", "ParallelConfig", "apply_overrides", "load_yaml", "model_config_from_dict",
    "model_preset",
]
