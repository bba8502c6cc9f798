"""Host memory a background save writes from: a snapshot of the tensors taken when the save starts.

An asynchronous save (``async_save``) copies every tensor it stores into buffers of a
:class:`HostStaging` before the training loop goes on, so the optimizer's next in-place update
cannot reach what is being written. The buffers are kept from one save to the next (one save is in
flight at a time, and the next waits for it, so a save's buffers are free again when the next one
copies into them): after the first save, staging costs one copy of the state and no allocation.
The price is host memory: one copy of what this rank checkpoints, held for the run.

When the state lives on a GPU the buffers are pinned and the copies are queued without blocking;
:meth:`HostStaging.finish` waits for them, so what the writer reads is complete.
"""

import torch


class HostStaging:
    """Named host buffers, reused across saves; :meth:`begin` a save, :meth:`buffer` or
    :meth:`copy` each tensor into them, then :meth:`finish`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        """Pinned (page-locked) buffers, filled by non-blocking device-to-host copies."""
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()

    def begin(self) -> None:
        """Start a save's snapshot (the previous save must be written: its buffers get reused)."""
        self._used = set()

    def buffer(self, key: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """The host buffer of ``key`` (allocated when its shape or dtype is new), to be filled by
        the caller; its contents are whatever the last save left there."""
        if key in self._used:
            raise ValueError(f"staging buffer {key!r} requested twice in one save")
        self._used.add(key)
        shape = torch.Size(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            self._buffers.pop(key, None)   # freed before its replacement is allocated
            buffer = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
            self._buffers[key] = buffer
        return buffer

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` in the buffer of ``key`` (complete after :meth:`finish`)."""
        buffer = self.buffer(key, tensor.shape, tensor.dtype)
        with torch.no_grad():
            buffer.copy_(tensor.detach(), non_blocking=self.pinned)
        return buffer

    def fill(self, buffer: torch.Tensor, value: torch.Tensor) -> None:
        """``buffer.copy_(value)`` as this staging copies (non-blocking into pinned memory)."""
        with torch.no_grad():
            buffer.copy_(value.detach(), non_blocking=self.pinned)

    def finish(self) -> None:
        """Wait for the queued copies; drop the buffers this save did not use."""
        if self.pinned:
            torch.cuda.synchronize(self.device)
        for key in set(self._buffers) - self._used:
            del self._buffers[key]

    @property
    def nbytes(self) -> int:
        """Host bytes the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def release(self) -> None:
        """Free every buffer (the next save allocates again)."""
        self._buffers.clear()
        self._used = set()


__all__ = ["HostStaging"]
