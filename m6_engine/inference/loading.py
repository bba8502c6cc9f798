"""What inference needs from a training run: the model from a checkpoint, its tokenizer, image features.

A checkpoint records the config it was trained with in its manifest (``m6_engine.training``
passes the whole job config; a bare ``ModelConfig`` is accepted too). The model is rebuilt from
it with pp = 1 and this process's tp, and ``load_checkpoint`` reshards the saved tensors into that
layout, whatever (tp, pp, dp) saved them. Images go through the same steps as the training
corpus (``m6_engine.data.vision``): decode, 224 x 224, 16 patches, the named extractor, and the
fp16 rounding the patch dataset stores features with.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from m6_engine.checkpoint import CheckpointError, load_checkpoint, read_manifest, resolve_checkpoint
from m6_engine.config import ConfigError, ModelConfig, model_config_from_dict
from m6_engine.data.doc_tokens import tokenizer_fingerprint
from m6_engine.data.model_inputs import ModelInputs, check_vocab, read_checkpoint_vocab
from m6_engine.data.tasks import SampleLayout
from m6_engine.data.tokenizer import BertWordPieceTokenizer, default_vocab_path
from m6_engine.data.vision import ExtractorConfig, build_extractor, image_to_patches, load_image
from m6_engine.model import M6Model
from m6_engine.parallel.state import ParallelState


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Weight dtypes a command line may ask for (half precision for GPUs; the CPU runs fp32)."""


@dataclass
class InferenceModel:
    """A loaded model with what it reads and writes text with."""

    model: M6Model
    """The whole model (pp = 1), eval mode."""
    tokenizer: BertWordPieceTokenizer
    layout: SampleLayout
    """Special ids and part budgets of the model's samples."""
    checkpoint: Path
    """The checkpoint folder read."""
    step: int
    """The training step it was saved at."""
    extractor: dict | None = None
    """The ``ExtractorConfig`` fields of the training corpus's image features, as the checkpoint
    records them (None: not recorded, or a text-only corpus)."""


def recorded_config(manifest: dict, folder: Path) -> tuple[ModelConfig, str]:
    """(model config, vocab file or "") recorded in a checkpoint manifest."""
    config = manifest.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):   # a job config
        vocab = (config.get("data") or {}).get("vocab_file") or ""
        return model_config_from_dict(config["model"]), vocab
    if isinstance(config, dict) and "num_layers" in config:                  # a bare ModelConfig
        return model_config_from_dict(config), ""
    raise CheckpointError(f"checkpoint {folder} records no model config in its manifest; it was "
                          "saved without config=..., so the model's shape is unknown")


def load_inference_model(checkpoint, state: ParallelState, *, dtype: torch.dtype = torch.float32,
                         vocab_file: str | None = None) -> InferenceModel:
    """Build the recorded model with ``state``'s tp (pp must be 1) and load ``checkpoint`` (a
    checkpoint folder, or a directory whose latest complete one is taken). Collective.

    The tokenizer reads ``vocab_file`` when given (refused when the checkpoint records another
    vocabulary), else the vocabulary stored in the checkpoint, else (older checkpoints) the file
    its config names, else the default vocabulary."""
    if state.pp_size != 1:
        raise ConfigError(f"inference runs with pp = 1, got pp = {state.pp_size}")
    folder = resolve_checkpoint(checkpoint)
    manifest = read_manifest(folder)
    config, recorded_vocab = recorded_config(manifest, folder)
    inputs = ModelInputs.from_manifest(manifest)
    tokenizer = BertWordPieceTokenizer(vocab_file or read_checkpoint_vocab(folder) or recorded_vocab
                                       or default_vocab_path())
    if vocab_file:
        check_vocab(tokenizer_fingerprint(tokenizer).hex(), inputs, chosen_what=f"vocabulary {vocab_file!r}",
                    recorded_what=f"checkpoint {folder}")
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the "
                          f"model's (ModelConfig.vocab_size = {config.vocab_size})")
    model = M6Model(config, state, dtype=dtype)
    loaded = load_checkpoint(folder, model=model, state=state)
    return InferenceModel(model.eval(), tokenizer, SampleLayout.from_model(config, tokenizer),
                          loaded.path, loaded.step, inputs.extractor if inputs else None)


def image_features(path, extractor_config: ExtractorConfig) -> torch.Tensor:
    """(16, 2048) fp32 patch features of an image file, as the training corpus stores them."""
    extractor = build_extractor(extractor_config)
    patches = image_to_patches(load_image(path, min_pixels=0))                   # (16, 3, 56, 56)
    features = extractor(patches)                                                # (16, D) fp32
    return features.to(torch.float16).to(torch.float32)   # the patch dataset keeps fp16
