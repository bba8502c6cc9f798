"""M6's four pretraining tasks and the image-text matching finetune task as packed samples, the
collator and the task-mixing sampler.

One sample is packed tightly: ``[patches][masked text][complete text][pad]`` (docs/design.md).
``prefix_len`` = patches + masked text (seen bidirectionally), ``valid_len`` = everything but the
trailing pad; the complete text is decoded causally and carries the loss. The complete text is
``[CLS] t1 .. tn [SEP]``: [CLS] starts decoding, [SEP] ends it; position p predicts token p + 1.
Position ids restart at 0 in each text part (patches take 0..15), so the result equals the paper's
padded-part layout while no compute is spent on pad in the middle.

Lengths (appendix A.1): with both text parts present each is truncated to half the text positions
(256 + 256 for M6); a single text part gets all of them (512).

Image-text matching (paper 4.1.1, appendix A.2) is a classification task, not a decoding one:
``[patches][text][SEP][pad]``, the whole sample is prefix (``prefix_len = valid_len``, so the last
valid position, the [SEP], sees the image and every text token), no token carries a loss, and
``itm_label`` is 1 for the image's own text, 0 for a substituted one. The model's matching head
reads the final hidden state at ``valid_len - 1`` (``m6_engine.model.heads``).
"""

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from m6_engine.data.batch import MicroBatch
from m6_engine.data.permutation import splitmix64

_TASK_TAG = 0x7461736B  # "task": the task stream's key never equals the permutations' or rng_of's
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: g -> key + g * _GOLDEN visits distinct words

# Segment ids: one learned segment embedding per part.
SEGMENT_IMAGE, SEGMENT_MASKED, SEGMENT_COMPLETE = 0, 1, 2

TASKS = ("text_denoising", "language_modelling", "image_to_text", "multimodal_to_text")
"""The decoding (pretraining) tasks: their loss is on complete-text tokens; per-task token losses
are vectors indexed by these ids."""
IMAGE_TEXT_MATCHING = "image_text_matching"
"""The matching task: a binary head on the last valid position, no decoded tokens."""
ALL_TASKS = TASKS + (IMAGE_TEXT_MATCHING,)
"""Every task a TaskMixer can draw; a sample's ``task_id`` is its task's position in this tuple."""
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
"""Ids of the decoding tasks (indices of the per-task token-loss vectors)."""
ALL_TASK_IDS = {name: i for i, name in enumerate(ALL_TASKS)}
"""Ids of every task: TASK_IDS and image_text_matching after them."""
NO_MATCH_LABEL = -1
"""``itm_label`` of a sample that is not an image-text matching sample."""

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
    itm_label: int = NO_MATCH_LABEL
    """Image-text matching: 1 for a true pair, 0 for a substituted text; -1 for other tasks."""


def pack(layout: SampleLayout, task: str, masked_ids, target_ids, patches=None) -> PackedSample:
    """Pack one sample from masked-text ids, target-text ids (no specials) and optional patches.

    Each text part is truncated to its budget: half of ``max_text_positions`` when both parts are
    present, all of it when only one is; the target keeps room for its [CLS] and [SEP].
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} for pack; the decoding tasks are {TASKS}")
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


def image_text_matching(layout: SampleLayout, patches, text_ids, label: int) -> PackedSample:
    """Image-text matching: patches + ``text [SEP]`` all in the prefix, no loss tokens, ``label``
    1 (the image's own text) or 0 (another's). The text keeps ``max_text_positions - 1`` tokens."""
    if label not in (0, 1):
        raise ValueError(f"an image-text matching label is 0 or 1, got {label!r}")
    if patches is None or tuple(patches.shape) != (layout.num_patches, layout.patch_feature_dim):
        raise ValueError(f"image-text matching needs patches of shape ({layout.num_patches}, "
                         f"{layout.patch_feature_dim}), got "
                         f"{None if patches is None else tuple(patches.shape)}")
    text = list(text_ids)[:layout.max_text_positions - 1] + [layout.sep_id]
    n_img, s = layout.num_patches, layout.seq_length
    valid_len = n_img + len(text)
    tokens = np.full(s, layout.pad_id, dtype=np.int64)
    tokens[n_img:valid_len] = text
    position_ids = np.zeros(s, dtype=np.int64)
    position_ids[:n_img] = np.arange(n_img)
    position_ids[n_img:valid_len] = np.arange(len(text))
    segment_ids = np.full(s, SEGMENT_COMPLETE, dtype=np.int64)
    segment_ids[:n_img] = SEGMENT_IMAGE
    segment_ids[n_img:valid_len] = SEGMENT_MASKED      # the prefix-text segment, as the question of VQA
    return PackedSample(tokens, position_ids, segment_ids, np.full(s, layout.pad_id, dtype=np.int64),
                        np.zeros(s, dtype=np.float32), np.asarray(patches, dtype=np.float32),
                        prefix_len=valid_len, valid_len=valid_len,
                        task_id=ALL_TASK_IDS[IMAGE_TEXT_MATCHING], itm_label=int(label))


def collate(samples: list, layout: SampleLayout) -> MicroBatch:
    """Stack packed samples into a :class:`~m6_engine.data.batch.MicroBatch` (its fields say the
    shapes); patches are zeros where a sample has no image, itm_labels -1 where a sample is not an
    image-text matching one."""
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

    return MicroBatch(
        tokens=stack("tokens"), position_ids=stack("position_ids"), segment_ids=stack("segment_ids"),
        labels=stack("labels"), loss_mask=stack("loss_mask"), patches=torch.from_numpy(patches),
        num_image_patches=ints([layout.num_patches if s.patches is not None else 0 for s in samples]),
        prefix_len=ints([s.prefix_len for s in samples]), valid_len=ints([s.valid_len for s in samples]),
        task_ids=ints([s.task_id for s in samples]), itm_labels=ints([s.itm_label for s in samples]))


def check_task_weights(weights: dict) -> None:
    """ValueError naming the problem: an unknown task, a negative weight, or no positive weight.
    A single task with a positive weight (finetuning) is valid."""
    unknown = sorted(set(weights) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in task weights; tasks are {ALL_TASKS}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")


class TaskMixer:
    """Chooses the task of every sample by configurable weights, deterministically.

    The choice depends only on (seed, sample index), never on the rank, so every tensor-parallel
    rank (and every pipeline stage) of a data-parallel replica sees the same task sequence, and a
    resumed run continues the same sequence from its saved sample index.
    """

    def __init__(self, weights: dict, seed: int):
        check_task_weights(weights)
        self.tasks = [t for t in ALL_TASKS if weights.get(t, 0) > 0]
        total = float(sum(weights[t] for t in self.tasks))
        self.probabilities = np.array([weights[t] / total for t in self.tasks])
        self.seed = seed
        self._edges = np.cumsum(self.probabilities)
        self._edges[-1] = 1.0   # rounding must not leave a sliver of [0, 1) without a task
        self._key = np.random.SeedSequence([seed, _TASK_TAG]).generate_state(1, np.uint64)[0]

    def tasks_of(self, first: int, count: int) -> List[str]:
        """The tasks of samples ``first .. first + count - 1``, at once.

        Sample g's task is where a uniform u_g in [0, 1) falls among the cumulative weights, u_g
        the top 53 bits of splitmix64(key + g * golden ratio): a counter-based draw, vectorised
        over a global batch. (A numpy Generator per sample cost ~100 us, every rank drawing the
        task of every sample of the global batch: 0.6 s of each 6144-sample step.)
        """
        g = np.arange(first, first + count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            bits = splitmix64(self._key + g * np.uint64(_GOLDEN))
        u = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        return [self.tasks[i] for i in np.searchsorted(self._edges, u, side="right").tolist()]

    def task_of(self, sample_index: int) -> str:
        """The task of the sample at a global index."""
        return self.tasks_of(sample_index, 1)[0]

    def rng_of(self, sample_index: int) -> np.random.Generator:
        """A generator for the sample's own random choices (e.g. the masked span)."""
        return np.random.default_rng([self.seed, sample_index, 1])
