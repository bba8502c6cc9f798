"""The micro-batch type: what collate makes, what it refuses, and its one move to a device."""

import dataclasses

import pytest
import torch

from m6_engine.data.batch import MicroBatch, check_on_device
from tests.m6_data import mixed_batch
from tests.test_model import TINY


def _fields(b=2, s=5, **overrides):
    tokens = torch.zeros(b, s, dtype=torch.long)
    return {"tokens": tokens, "position_ids": tokens.clone(), "prefix_len": torch.zeros(b, dtype=torch.long),
            "valid_len": torch.full((b,), s), **overrides}


def test_collate_makes_a_complete_frozen_micro_batch():
    batch = mixed_batch(TINY, 0, 3)
    assert isinstance(batch, MicroBatch) and batch.batch_size == 3
    assert all(getattr(batch, f.name) is not None for f in dataclasses.fields(batch) if f.name != "sample_index")
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.tokens = batch.tokens


@pytest.mark.parametrize("overrides, message", [
    ({"tokens": torch.zeros(5, dtype=torch.long)}, r"MicroBatch.tokens must be \(B, S\), got \(5,\)"),
    ({"valid_len": torch.zeros(3, dtype=torch.long)}, "MicroBatch.valid_len has 3 samples, tokens 2"),
    ({"position_ids": torch.zeros(2, 4, dtype=torch.long)}, r"position_ids must be \(B, S\) = \(2, 5\), got \(2, 4\)"),
    ({"labels": torch.zeros(2, 5, dtype=torch.long)}, "labels and loss_mask go together"),
    ({"patches": torch.zeros(2, 4, 8)}, "patches and num_image_patches go together"),
    ({"task_ids": [0, 1]}, "MicroBatch.task_ids must be a tensor or None, got list"),
])
def test_bad_micro_batches_are_refused_naming_the_field(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MicroBatch(**_fields(**overrides))


def test_to_moves_every_tensor_once_and_is_a_no_op_when_there():
    batch = mixed_batch(TINY, 0, 2)
    assert batch.to("cpu") is batch
    moved = batch.to("meta")
    assert all(getattr(moved, f.name) is None or getattr(moved, f.name).device.type == "meta"
               for f in dataclasses.fields(moved))
    with pytest.raises(ValueError, match="stage 0: the micro-batch is on meta, the model on cpu: move it once"):
        check_on_device(moved, torch.device("cpu"), "stage 0")
