"""Packed sample layouts of the four pretraining tasks, checked by hand, and the task mixer."""

import numpy as np
import pytest
import torch

from m6_engine.data import tasks
from m6_engine.data.tasks import SEGMENT_COMPLETE, SEGMENT_IMAGE, SEGMENT_MASKED, SampleLayout

PAD, CLS, SEP, MASK = 0, 101, 102, 103
LAYOUT = SampleLayout(num_patches=2, patch_feature_dim=3, max_text_positions=10,
                      pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK)


def _patches():
    return np.arange(6, dtype=np.float32).reshape(2, 3)


def test_multimodal_layout_by_hand():
    s = tasks.multimodal_to_text(LAYOUT, _patches(), [7, 8], [9, 10, 11])
    # [p p][7 8][CLS 9 10 11 SEP][pad pad pad]  -> S = 2 + 10 = 12
    assert s.tokens.tolist() == [PAD, PAD, 7, 8, CLS, 9, 10, 11, SEP, PAD, PAD, PAD]
    assert s.position_ids.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 4, 0, 0, 0]
    assert s.segment_ids.tolist() == [SEGMENT_IMAGE] * 2 + [SEGMENT_MASKED] * 2 + [SEGMENT_COMPLETE] * 8
    assert (s.prefix_len, s.valid_len) == (4, 9)
    assert s.labels[4:8].tolist() == [9, 10, 11, SEP]
    assert s.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert s.task_id == tasks.TASK_IDS["multimodal_to_text"]


def test_language_modelling_has_empty_prefix_and_full_budget():
    s = tasks.language_modelling(LAYOUT, list(range(1, 30)))
    # One text part gets all 10 positions: CLS + 8 tokens + SEP, no patches.
    assert (s.prefix_len, s.valid_len) == (0, 10)
    assert s.tokens[:10].tolist() == [CLS] + list(range(1, 9)) + [SEP]
    assert s.position_ids[:10].tolist() == list(range(10))
    assert s.patches is None


def test_image_to_text_has_empty_masked_part():
    s = tasks.image_to_text(LAYOUT, _patches(), [5, 6])
    assert (s.prefix_len, s.valid_len) == (2, 6)
    assert s.tokens[2:6].tolist() == [CLS, 5, 6, SEP]
    np.testing.assert_array_equal(s.patches, _patches())


def test_both_parts_truncate_to_half_each_and_never_overflow():
    s = tasks.multimodal_to_text(LAYOUT, _patches(), list(range(1, 50)), list(range(1, 50)))
    # masked: 5 positions, complete: CLS + 3 + SEP = 5 -> valid = 2 + 10 = S
    assert s.prefix_len == 2 + 5 and s.valid_len == LAYOUT.seq_length
    assert s.tokens[7:].tolist() == [CLS, 1, 2, 3, SEP]


def test_text_denoising_masks_one_span_of_fifteen_percent():
    layout = SampleLayout(0, 3, 64, PAD, CLS, SEP, MASK)
    ids = list(range(1000, 1020))  # 20 tokens -> a span of 3 replaced by one [MASK]
    s = tasks.text_denoising(layout, ids, np.random.default_rng(0))
    masked = s.tokens[:s.prefix_len].tolist()
    assert masked.count(MASK) == 1 and len(masked) == 20 - 3 + 1
    i = masked.index(MASK)
    assert masked[:i] == ids[:i] and masked[i + 1:] == ids[i + 3:]
    assert s.tokens[s.prefix_len:s.valid_len].tolist() == [CLS] + ids + [SEP]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.pack(LAYOUT, "captioning", [], [1])
    with pytest.raises(ValueError, match="patches must have shape"):
        tasks.image_to_text(LAYOUT, np.zeros((3, 3), np.float32), [1])


def test_collate_shapes_and_patch_counts():
    batch = tasks.collate([tasks.image_to_text(LAYOUT, _patches(), [5]),
                           tasks.language_modelling(LAYOUT, [5, 6])], LAYOUT)
    assert batch.tokens.shape == (2, 12) and batch.patches.shape == (2, 2, 3)
    assert batch.num_image_patches.tolist() == [2, 0]
    assert batch.prefix_len.tolist() == [2, 0] and batch.valid_len.tolist() == [5, 4]
    assert torch.equal(batch.patches[1], torch.zeros(2, 3))


def test_task_mixer_is_deterministic_and_follows_weights():
    mixer = tasks.TaskMixer({"text_denoising": 3, "image_to_text": 1}, seed=5)
    first = [mixer.task_of(i) for i in range(4000)]
    assert first == [tasks.TaskMixer({"text_denoising": 3, "image_to_text": 1}, seed=5).task_of(i)
                     for i in range(4000)]
    share = first.count("text_denoising") / len(first)
    assert 0.72 < share < 0.78
    assert set(first) == {"text_denoising", "image_to_text"}
    with pytest.raises(ValueError, match="unknown task"):
        tasks.TaskMixer({"vqa": 1}, seed=0)


def test_vectorised_task_draws_equal_the_per_sample_formula():
    """tasks_of's numpy draw against the same formula in Python integers, one sample at a time."""
    import bisect

    from m6_engine.data.permutation import _mix64

    weights = {"text_denoising": 1, "language_modelling": 2, "image_to_text": 0.5, "multimodal_to_text": 3}
    mixer = tasks.TaskMixer(weights, seed=123)
    key, edges = int(mixer._key), mixer._edges.tolist()

    def reference(g):
        u = (_mix64((key + g * tasks._GOLDEN) % 2**64) >> 11) * 2.0 ** -53
        return mixer.tasks[bisect.bisect_right(edges, u)]

    first = 2**40 - 500   # large indices too: the uint64 arithmetic wraps like the reference's
    assert mixer.tasks_of(first, 1000) == [reference(g) for g in range(first, first + 1000)]
    assert mixer.tasks_of(7, 5) == [mixer.task_of(g) for g in range(7, 12)]
    other = tasks.TaskMixer(weights, seed=124)
    assert other.tasks_of(0, 200) != mixer.tasks_of(0, 200)
