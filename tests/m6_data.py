"""Tokenizer-free M6 micro-batches for model tests: the four tasks of ``m6_engine.data.tasks`` and
image-text matching on random but learnable ids (arithmetic progressions) and random patch
features (a matching sample's label is drawn at random: its text is as unrelated to its image as
any other, so the label is only learnable through the data, not asked of these batches)."""

import numpy as np

from m6_engine.data.tasks import (
    IMAGE_TEXT_MATCHING, SampleLayout, TaskMixer, collate, image_text_matching, image_to_text,
    language_modelling, multimodal_to_text, text_denoising,
)

# bert-base-chinese special ids; real words start after them.
PAD, CLS, SEP, MASK, FIRST_WORD = 0, 101, 102, 103, 104
ALL_TASKS = {"text_denoising": 1, "language_modelling": 1, "image_to_text": 1, "multimodal_to_text": 1}


def layout_of(config) -> SampleLayout:
    return SampleLayout(num_patches=config.num_patches, patch_feature_dim=config.patch_feature_dim,
                        max_text_positions=config.max_text_positions, pad_id=PAD, cls_id=CLS,
                        sep_id=SEP, mask_id=MASK)


def _progression(rng, length: int, vocab_size: int) -> list:
    """start + stride * i over a band of 200 ids: a pattern a tiny model learns in a few steps."""
    band = min(200, vocab_size - FIRST_WORD)
    start, stride = int(rng.integers(0, band)), int(rng.integers(1, 4))
    return [FIRST_WORD + (start + stride * i) % band for i in range(length)]


def sample(config, task: str, rng: np.random.Generator):
    """One packed sample of ``task`` with text lengths drawn to fit the config's positions."""
    layout = layout_of(config)
    half = config.max_text_positions // 2

    def words():
        return _progression(rng, int(rng.integers(3, half - 2)), config.vocab_size)

    def patches():
        shape = (config.num_patches, config.patch_feature_dim)
        return rng.standard_normal(shape).astype(np.float32)

    if task == "text_denoising":
        return text_denoising(layout, words(), rng)
    if task == "language_modelling":
        return language_modelling(layout, words())
    if task == "image_to_text":
        return image_to_text(layout, patches(), words())
    if task == IMAGE_TEXT_MATCHING:
        return image_text_matching(layout, patches(), words(), int(rng.integers(0, 2)))
    return multimodal_to_text(layout, patches(), words(), words())


def mixed_batch(config, first_index: int, batch_size: int, seed: int = 0,
                weights: dict | None = None) -> dict:
    """Collated samples ``first_index ..`` with tasks drawn by a TaskMixer (deterministic)."""
    mixer = TaskMixer(weights or ALL_TASKS, seed)
    samples = [sample(config, mixer.task_of(i), mixer.rng_of(i))
               for i in range(first_index, first_index + batch_size)]
    return collate(samples, layout_of(config))


def task_batch(config, tasks: list, seed: int = 0) -> dict:
    """One sample of each named task, in order."""
    rng = np.random.default_rng(seed)
    return collate([sample(config, t, rng) for t in tasks], layout_of(config))
