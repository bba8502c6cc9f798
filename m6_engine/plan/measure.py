"""Measure what the planner predicts, on a live job: saved activations and resident state.

:class:`SavedActivations` counts the unique storage bytes of the tensors autograd saves for
backward while its hooks are active (``torch.autograd.graph.saved_tensors_hooks``), parameters and
buffers excluded: the quantity ``plan.memory`` calls activations, independent of allocator
caching or process RSS. A storage is dropped once the graph has freed every saved tensor that
refers to it, so ``live`` is what backward still needs at any moment: wrap each micro-batch's
forward in :meth:`hooks` and read ``live`` after it to see the in-flight micro-batches of a
pipeline schedule. :func:`resident_bytes` sums the persistent state the plan's weights,
gradients and optimizer columns describe.
"""

import itertools

import torch
from torch import nn


class SavedActivations:
    """Live bytes of saved-for-backward storages of ``module``'s forwards (module docstring)."""

    def __init__(self, module: nn.Module):
        self.skip = {t.untyped_storage().data_ptr()
                     for t in itertools.chain(module.parameters(), module.buffers())}
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _hold(self, key: int, nbytes: int) -> None:
        if not self.refs.get(key):
            self.sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)

    def hooks(self):
        """Context manager: saved tensors of the forwards run inside it are counted."""
        meter = self

        class Held:
            """What autograd keeps instead of the tensor; deleted when the graph frees it."""

            def __init__(self, tensor: torch.Tensor):
                self.tensor = tensor
                storage = tensor.untyped_storage()
                self.key = None if storage.data_ptr() in meter.skip else storage.data_ptr()
                if self.key is not None:
                    meter._hold(self.key, storage.nbytes())

            def __del__(self):
                if self.key is not None:
                    meter._release(self.key)

        return torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)


def resident_bytes(module: nn.Module, grad_buffer: torch.Tensor | None = None,
                   optimizer=None) -> dict[str, int]:
    """{"weights", "gradients", "optimizer"} bytes of a stage: its parameters, the data-parallel
    fp32 gradient buffer (``DataParallel.grad_buffer``) and ``optimizer.state_bytes()``."""
    return {"weights": sum(p.nbytes for p in module.parameters()),
            "gradients": 0 if grad_buffer is None else grad_buffer.nbytes,
            "optimizer": 0 if optimizer is None else optimizer.state_bytes()}
