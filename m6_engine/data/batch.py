"""The micro-batch: what the model, its FLOPs counter, inference and megatron_ext read, by field.

``m6_engine.data.tasks.collate`` makes one from packed samples (the dataset adds each sample's
global index); inference packs prompts into one without training targets. It is moved to the
stage's device once (:meth:`MicroBatch.to`, in ``ForwardStep`` and the inference steppers); the
model checks that it was, rather than copying fields on every access.
"""

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """B packed samples of S positions ([patches][masked text][complete text][pad])."""

    tokens: torch.Tensor
    """(B, S) int64 token ids (0 at image and pad positions)."""
    position_ids: torch.Tensor
    """(B, S) int64 position of each token within its part."""
    prefix_len: torch.Tensor
    """(B,) int64: positions [0, prefix_len) attend bidirectionally."""
    valid_len: torch.Tensor
    """(B,) int64: positions past valid_len are padding."""
    segment_ids: torch.Tensor | None = None
    """(B, S) int64 part of each position (image, masked text, complete text); None for a model
    without segment embeddings (an imported GPT-2)."""
    patches: torch.Tensor | None = None
    """(B, num_patches, feature_dim) fp32 patch features (zeros for samples without an image);
    None for a text-only batch."""
    num_image_patches: torch.Tensor | None = None
    """(B,) int64 image positions of each sample (0 or num_patches); with ``patches``."""
    labels: torch.Tensor | None = None
    """(B, S) int64 next-token targets; None where no loss is computed (inference)."""
    loss_mask: torch.Tensor | None = None
    """(B, S) fp32, 1 at the tokens that carry a loss; with ``labels``."""
    task_ids: torch.Tensor | None = None
    """(B,) int64 index in ``m6_engine.data.tasks.TASKS`` of each sample's task."""
    itm_labels: torch.Tensor | None = None
    """(B,) int64 image-text matching label (1 match, 0 not), -1 for other tasks' samples."""
    sample_index: torch.Tensor | None = None
    """(B,) int64 global index of each sample in the dataset's stream."""

    def __post_init__(self):
        if self.tokens.dim() != 2:
            raise ValueError(f"MicroBatch.tokens must be (B, S), got {tuple(self.tokens.shape)}")
        b, s = self.tokens.shape
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or field.name == "tokens":
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"MicroBatch.{field.name} must be a tensor or None, got {type(value).__name__}")
            if value.shape[0] != b:
                raise ValueError(f"MicroBatch.{field.name} has {value.shape[0]} samples, tokens {b}")
        for name in ("position_ids", "segment_ids", "labels", "loss_mask"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, s):
                raise ValueError(f"MicroBatch.{name} must be (B, S) = {(b, s)}, got {tuple(value.shape)}")
        if (self.patches is None) != (self.num_image_patches is None):
            raise ValueError("MicroBatch.patches and num_image_patches go together (both or neither)")
        if (self.labels is None) != (self.loss_mask is None):
            raise ValueError("MicroBatch.labels and loss_mask go together (both or neither)")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        """The same batch with every tensor on ``device`` (self when they all are); ``non_blocking``
        copies asynchronously from pinned memory (``data.prefetch``)."""
        device = torch.device(device)
        if all(t is None or t.device == device for t in self._tensors()):
            return self
        return dataclasses.replace(self, **{f.name: None if getattr(self, f.name) is None
                                            else getattr(self, f.name).to(device, non_blocking=non_blocking)
                                            for f in dataclasses.fields(self)})

    def _tensors(self):
        return (getattr(self, f.name) for f in dataclasses.fields(self))


def check_on_device(batch: MicroBatch, device: torch.device, where: str) -> None:
    """A clear error for a batch that was not moved to the stage's device (MicroBatch.to)."""
    if batch.prefix_len.device != device:
        raise ValueError(f"{where}: the micro-batch is on {batch.prefix_len.device}, the model on {device}: "
                         f"move it once with batch.to(device)")
