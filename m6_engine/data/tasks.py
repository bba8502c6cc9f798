"""M6's four pretraining tasks as packed samples, the collator and the task-mixing sampler.

One sample is packed tightly: ``[patches][masked text][complete text][pad]`` (DESIGN.md).
``prefix_len`` = patches + masked text (seen bidirectionally), ``valid_len`` = everything but the
trailing pad; the complete text is decoded causally and carries the loss. The complete text is
``[CLS] t1 .. tn [SEP]``: [CLS] starts decoding, [SEP] ends it; position p predicts token p + 1.
Position ids restart at 0 in each text part (patches take 0..15), so the result equals the paper's
padded-part layout while no compute is spent on pad in the middle.

Lengths (appendix A.1): with both text parts present each is truncated to half the text positions
(256 + 256 for M6); a single text part gets all of them (512).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# Segment ids: one learned segment embedding per part.
SEGMENT_IMAGE, SEGMENT_MASKED, SEGMENT_COMPLETE = 0, 1, 2

TASKS = ("text_denoising", "language_modelling", "image_to_text", "multimodal_to_text")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}

# Fraction of the text covered by the single masked span of text denoising (paper 3.3, after BERT).
DENOISING_SPAN_FRACTION = 0.15


@dataclass(frozen=True)
class SampleLayout:
    """Sizes and special token ids a packed sample needs."""

    num_patches: int
    """Patch slots at the start of a sample with an image."""
    patch_feature_dim: int
    """Dimension of one patch feature."""
    max_text_positions: int
    """Text positions of a sample: the budget of masked + complete text."""
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    @property
    def seq_length(self) -> int:
        """Length of every packed sample: patches + all text positions."""
        return self.num_patches + self.max_text_positions

    @classmethod
    def from_model(cls, model_config, tokenizer) -> "SampleLayout":
        return cls(num_patches=model_config.num_patches,
                   patch_feature_dim=model_config.patch_feature_dim,
                   max_text_positions=model_config.max_text_positions,
                   pad_id=tokenizer.pad_id, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                   mask_id=tokenizer.mask_id)


@dataclass
class PackedSample:
    """One sample; every array has length ``seq_length`` except ``patches`` (num_patches, feature_dim)."""

    tokens: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    patches: Optional[np.ndarray]
    prefix_len: int
    valid_len: int
    task_id: int


def pack(layout: SampleLayout, task: str, masked_ids, target_ids, patches=None) -> PackedSample:
    """Pack one sample from masked-text ids, target-text ids (no specials) and optional patches.

    Each text part is truncated to its budget: half of ``max_text_positions`` when both parts are
    present, all of it when only one is; the target keeps room for its [CLS] and [SEP].
    """
    if task not in TASK_IDS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    if patches is not None and tuple(patches.shape) != (layout.num_patches, layout.patch_feature_dim):
        raise ValueError(f"patches must have shape ({layout.num_patches}, {layout.patch_feature_dim}), "
                         f"got {tuple(patches.shape)}")
    text_budget = layout.max_text_positions
    masked_budget = text_budget // 2 if len(masked_ids) else 0
    masked = list(masked_ids)[:masked_budget]
    complete_budget = text_budget - masked_budget
    if complete_budget < 3:
        raise ValueError(f"max_text_positions = {text_budget} leaves no room for a target text")
    complete = [layout.cls_id] + list(target_ids)[:complete_budget - 2] + [layout.sep_id]

    n_img = layout.num_patches if patches is not None else 0
    s = layout.seq_length
    tokens = np.full(s, layout.pad_id, dtype=np.int64)
    position_ids = np.zeros(s, dtype=np.int64)
    segment_ids = np.full(s, SEGMENT_COMPLETE, dtype=np.int64)
    labels = np.full(s, layout.pad_id, dtype=np.int64)
    loss_mask = np.zeros(s, dtype=np.float32)

    parts = ((n_img, SEGMENT_IMAGE, None), (len(masked), SEGMENT_MASKED, masked),
             (len(complete), SEGMENT_COMPLETE, complete))
    start = 0
    for length, segment, ids in parts:
        end = start + length
        position_ids[start:end] = np.arange(length)
        segment_ids[start:end] = segment
        if ids is not None:
            tokens[start:end] = ids
        start = end
    prefix_len = n_img + len(masked)
    valid_len = start
    # Position p of the complete text predicts token p + 1; the last one ([SEP]) predicts nothing.
    labels[prefix_len:valid_len - 1] = tokens[prefix_len + 1:valid_len]
    loss_mask[prefix_len:valid_len - 1] = 1.0
    return PackedSample(tokens, position_ids, segment_ids, labels, loss_mask,
                        None if patches is None else np.asarray(patches, dtype=np.float32),
                        prefix_len, valid_len, TASK_IDS[task])


def mask_one_span(ids, mask_id: int, rng: np.random.Generator, fraction: float = DENOISING_SPAN_FRACTION):
    """Replace one continuous span of about ``fraction`` of the tokens by a single [MASK]."""
    ids = list(ids)
    if not ids:
        return [mask_id]
    span = max(1, int(round(fraction * len(ids))))
    start = int(rng.integers(0, len(ids) - span + 1))
    return ids[:start] + [mask_id] + ids[start + span:]


def text_denoising(layout: SampleLayout, ids, rng: np.random.Generator) -> PackedSample:
    """Text-to-text: the text with one span masked is the prefix; decode the whole text (256 + 256)."""
    ids = list(ids)[:layout.max_text_positions // 2 - 2]
    return pack(layout, "text_denoising", mask_one_span(ids, layout.mask_id, rng), ids)


def language_modelling(layout: SampleLayout, ids) -> PackedSample:
    """Text-to-text with an empty prefix: plain causal language modelling over up to 512 tokens."""
    return pack(layout, "language_modelling", [], ids)


def image_to_text(layout: SampleLayout, patches, caption_ids) -> PackedSample:
    """Image-to-text: 16 patches, empty masked part, the caption as complete text."""
    return pack(layout, "image_to_text", [], caption_ids, patches)


def multimodal_to_text(layout: SampleLayout, patches, masked_ids, target_ids) -> PackedSample:
    """Multimodality-to-text: patches + masked text as prefix, the target text decoded."""
    return pack(layout, "multimodal_to_text", masked_ids, target_ids, patches)


def collate(samples: list, layout: SampleLayout) -> dict:
    """Stack packed samples into a micro-batch of tensors.

    tokens, position_ids, segment_ids, labels (B, S) int64; loss_mask (B, S) fp32;
    patches (B, num_patches, feature_dim) fp32 (zeros where a sample has no image);
    num_image_patches, prefix_len, valid_len, task_ids (B,) int64.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    b = len(samples)
    patches = np.zeros((b, layout.num_patches, layout.patch_feature_dim), dtype=np.float32)
    for i, sample in enumerate(samples):
        if sample.patches is not None:
            patches[i] = sample.patches

    def stack(name):
        return torch.from_numpy(np.stack([getattr(s, name) for s in samples]))

    def ints(values):
        return torch.tensor(values, dtype=torch.int64)

    return {
        "tokens": stack("tokens"), "position_ids": stack("position_ids"),
        "segment_ids": stack("segment_ids"), "labels": stack("labels"), "loss_mask": stack("loss_mask"),
        "patches": torch.from_numpy(patches),
        "num_image_patches": ints([layout.num_patches if s.patches is not None else 0 for s in samples]),
        "prefix_len": ints([s.prefix_len for s in samples]),
        "valid_len": ints([s.valid_len for s in samples]),
        "task_ids": ints([s.task_id for s in samples]),
    }


class TaskMixer:
    """Chooses the task of every sample by configurable weights, deterministically.

    The choice depends only on (seed, sample index), never on the rank, so every tensor-parallel
    rank (and every pipeline stage) of a data-parallel replica sees the same task sequence, and a
    resumed run continues the same sequence from its saved sample index.
    """

    def __init__(self, weights: dict, seed: int):
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in task weights; tasks are {TASKS}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0]
        total = float(sum(weights[t] for t in self.tasks))
        self.probabilities = np.array([weights[t] / total for t in self.tasks])
        self.seed = seed

    def task_of(self, sample_index: int) -> str:
        """The task of the sample at a global index."""
        rng = np.random.default_rng([self.seed, sample_index])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]

    def rng_of(self, sample_index: int) -> np.random.Generator:
        """A generator for the sample's own random choices (e.g. the masked span)."""
        return np.random.default_rng([self.seed, sample_index, 1])
