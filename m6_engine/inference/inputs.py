"""What decoding and scoring start from, and how a batch of them is laid out for the first pass.

A :class:`Prompt` is one sample's prefix (image patches, masked text) plus the opening of its
complete text: for M6 ``[CLS]`` and any forced answer start, for an imported GPT-2 the whole
prompt (a GPT-2 is an M6 with an empty prefix). Rows are packed left-aligned exactly as
``m6_engine.data.tasks.pack`` packs a training sample, so each row keeps the positions it was
trained with:

    row b:  [patches_b][masked_b][complete_b][pad ...]        prefix_len_b = |patches_b| + |masked_b|
    positions restart at 0 in every part; segments image / masked / complete

and ``valid_len_b`` is the row's filled length. Decoding then appends row b's next token at slot
``valid_len_b`` (its own cursor), with complete-text position ``cursor_b - prefix_len_b``.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from m6_engine.data.batch import MicroBatch
from m6_engine.data.tasks import SEGMENT_COMPLETE, SEGMENT_IMAGE, SEGMENT_MASKED, SampleLayout


@dataclass(frozen=True)
class Prompt:
    """One sample to continue or score: prefix (patches, masked text) and complete-text opening."""

    masked_ids: tuple = ()
    """The masked text (prefix, seen bidirectionally); empty for image-to-text and plain LM."""
    patches: Optional[torch.Tensor] = None
    """(num_patches, patch_feature_dim) image features, or None for a text-only sample."""
    complete_ids: tuple = ()
    """Opening of the complete text (M6: ``[CLS]`` + forced tokens); generation needs at least
    one token, the prefix given to ``score`` none."""

    def __post_init__(self):
        object.__setattr__(self, "masked_ids", tuple(int(t) for t in self.masked_ids))
        object.__setattr__(self, "complete_ids", tuple(int(t) for t in self.complete_ids))
        if self.patches is not None:
            object.__setattr__(self, "patches", torch.as_tensor(self.patches, dtype=torch.float32))

    @property
    def has_prefix(self) -> bool:
        return bool(self.masked_ids) or self.patches is not None


def m6_prompt(layout: SampleLayout, masked_ids: Sequence[int] = (), patches=None,
              answer_start: Sequence[int] = ()) -> Prompt:
    """An M6 prompt as the pretraining tasks build one: ``[CLS] answer_start`` opens the complete
    text. The masked text must fit its training budget (half the text positions when present);
    a longer one is an error, not a silent cut. Patch shapes are checked when packed."""
    budget = layout.max_text_positions // 2
    if len(masked_ids) > budget:
        raise ValueError(f"the masked text has {len(masked_ids)} tokens; its budget is "
                         f"max_text_positions / 2 = {budget}")
    return Prompt(masked_ids=tuple(masked_ids), patches=patches,
                  complete_ids=(layout.cls_id, *answer_start))


def complete_text(layout: SampleLayout, ids: Sequence[int]) -> tuple:
    """``[CLS] ids [SEP]``: a whole complete text as training decodes it (what :func:`score` rates)."""
    return (layout.cls_id, *ids, layout.sep_id)


def pack_prompts(prompts: Sequence[Prompt], num_patches: int, patch_feature_dim: int) -> MicroBatch:
    """Lay prompts out as rows ``[patches][masked][complete][pad]`` (module docstring): a
    micro-batch without training targets, ready for the first forward pass. ``prefix_len`` (R,) is
    each row's patches + masked text, ``valid_len`` (R,) its filled length (prefix + complete-text
    opening); patches and num_image_patches only when some row has an image.

    ``num_patches`` = 0 (e.g. an imported GPT-2) allows no patches. Pad slots hold token 0; they
    are beyond ``valid_len`` and never attended.
    """
    if not prompts:
        raise ValueError("no prompts given")
    lengths = []
    for i, p in enumerate(prompts):
        if p.patches is not None:
            if num_patches == 0:
                raise ValueError(f"prompt {i} has patches but the model takes none (num_patches = 0)")
            if tuple(p.patches.shape) != (num_patches, patch_feature_dim):
                raise ValueError(f"prompt {i}: patches must be ({num_patches}, {patch_feature_dim}), "
                                 f"got {tuple(p.patches.shape)}")
        n_img = num_patches if p.patches is not None else 0
        lengths.append((n_img, len(p.masked_ids), len(p.complete_ids)))
    rows, width = len(prompts), max(sum(parts) for parts in lengths)
    tokens = torch.zeros(rows, width, dtype=torch.long)
    position_ids = torch.zeros(rows, width, dtype=torch.long)
    segment_ids = torch.full((rows, width), SEGMENT_COMPLETE, dtype=torch.long)
    for b, (p, (n_img, n_masked, n_complete)) in enumerate(zip(prompts, lengths)):
        start = 0
        for length, segment, ids in ((n_img, SEGMENT_IMAGE, None), (n_masked, SEGMENT_MASKED, p.masked_ids),
                                     (n_complete, SEGMENT_COMPLETE, p.complete_ids)):
            end = start + length
            position_ids[b, start:end] = torch.arange(length)
            segment_ids[b, start:end] = segment
            if ids is not None:
                tokens[b, start:end] = torch.tensor(ids, dtype=torch.long)
            start = end
    patches = num_image_patches = None
    if any(p.patches is not None for p in prompts):   # text-only rows may be shorter than the patches
        patches = torch.zeros(rows, num_patches, patch_feature_dim)
        for b, p in enumerate(prompts):
            if p.patches is not None:
                patches[b] = p.patches
        num_image_patches = torch.tensor([n for n, _, _ in lengths], dtype=torch.long)
    return MicroBatch(tokens=tokens, position_ids=position_ids, segment_ids=segment_ids,
                      prefix_len=torch.tensor([n + m for n, m, _ in lengths], dtype=torch.long),
                      valid_len=torch.tensor([sum(parts) for parts in lengths], dtype=torch.long),
                      patches=patches, num_image_patches=num_image_patches)
