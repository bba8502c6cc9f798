"""Measure what the planner predicts, on a live job: saved activations, resident state, traffic.

:class:`SavedActivations` counts the unique storage bytes of the tensors autograd saves for
backward while its hooks are active (``torch.autograd.graph.saved_tensors_hooks``), parameters and
buffers excluded: the quantity ``plan.memory`` calls activations, independent of allocator
caching or process RSS. A storage is dropped once the graph has freed every saved tensor that
refers to it, so ``live`` is what backward still needs at any moment: wrap each micro-batch's
forward in :meth:`hooks` and read ``live`` after it to see the in-flight micro-batches of a
pipeline schedule. Parameters are recognised by their storage itself, not its address: ZeRO-3
resizes a gathered layer's storage, which moves it. :func:`resident_bytes` sums the persistent
state the plan's weights, gradients and optimizer columns describe, as stored: ZeRO-1/2's flat
parameter buffer, ZeRO-3's parameter shards (its freed full-size parameters hold no bytes).
:class:`CommunicatedBytes` counts what this rank sends in each collective of a process group
(the volumes of ``plan.perf``).
"""

import contextlib
import itertools

import torch
import torch.distributed as dist
from torch import nn


def _storage_id(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage that survives a resize (the StorageImpl, not its data pointer)."""
    return t.untyped_storage()._cdata


class SavedActivations:
    """Live bytes of saved-for-backward storages of ``module``'s forwards (module docstring)."""

    def __init__(self, module: nn.Module):
        self.skip = {_storage_id(t) for t in itertools.chain(module.parameters(), module.buffers())}
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
                key = _storage_id(tensor)
                self.key = None if key in meter.skip else key
                if self.key is not None:
                    meter._hold(self.key, tensor.untyped_storage().nbytes())

            def __del__(self):
                if self.key is not None:
                    meter._release(self.key)

        return torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)


def stored_parameter_bytes(module: nn.Module) -> int:
    """Bytes the parameters of ``module`` occupy as stored: each distinct storage once (views of a
    flat buffer count the buffer), plus ZeRO-3's shards (``DataParallel.sharded_params``)."""
    storages = {}
    for p in module.parameters():
        storages[_storage_id(p)] = p.untyped_storage().nbytes()
    sharded = getattr(module, "sharded_params", None)
    return sum(storages.values()) + (0 if sharded is None else sharded.shards.nbytes)


def resident_bytes(module: nn.Module, grad_buffer: torch.Tensor | None = None,
                   optimizer=None) -> dict[str, int]:
    """{"weights", "gradients", "optimizer"} bytes of a stage: its parameters as stored
    (:func:`stored_parameter_bytes`; call it between steps, when ZeRO-3 holds no layer
    gathered), the data-parallel fp32 gradient buffer (``DataParallel.grad_buffer``) and
    ``optimizer.state_bytes()``."""
    return {"weights": stored_parameter_bytes(module),
            "gradients": 0 if grad_buffer is None else grad_buffer.nbytes,
            "optimizer": 0 if optimizer is None else optimizer.state_bytes()}


# The modules that call the flat collectives by the name they imported (``parallel.collectives``).
_FLAT_COLLECTIVE_USERS = ("m6_engine.parallel.mappings", "m6_engine.parallel.data_parallel",
                          "m6_engine.parallel.sharded_params", "m6_engine.optim.zero",
                          "m6_engine.parallel.cross_entropy")


class CommunicatedBytes:
    """Bytes this rank sends per process group while :meth:`counting` is active.

    ``groups`` names the groups to count ({"tp": group, ...}); collectives of other groups are
    ignored. Ring costs per rank, as ``plan.perf`` counts them: an all-reduce of B bytes sends
    2 (n - 1) / n B, an all-gather or reduce-scatter (n - 1) / n of the full-size tensor, a p2p
    batch the tensors it sends. ``calls`` counts the collectives per group.
    """

    def __init__(self, groups: dict):
        self.groups = groups
        self.bytes = {name: 0.0 for name in groups}
        self.calls = {name: 0 for name in groups}

    def _name(self, group) -> str | None:
        return next((name for name, g in self.groups.items() if g is group), None)

    def _add(self, group, nbytes: float) -> None:
        name = self._name(group)
        if name is not None:
            self.bytes[name] += nbytes
            self.calls[name] += 1

    @contextlib.contextmanager
    def counting(self):
        import importlib

        meter = self
        all_reduce, batch = dist.all_reduce, dist.batch_isend_irecv

        def counted_all_reduce(tensor, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            meter._add(group, 2 * (n - 1) / n * tensor.nbytes)
            return all_reduce(tensor, *args, group=group, **kwargs)

        def flat(fn, full_is_output: bool):
            def counted(output, input, *args, group=None, **kwargs):
                n = dist.get_world_size(group)
                meter._add(group, (n - 1) / n * (output if full_is_output else input).nbytes)
                return fn(output, input, *args, group=group, **kwargs)
            return counted

        def counted_batch(ops):
            for op in ops:
                if op.op is dist.isend:
                    meter._add(op.group, op.tensor.nbytes)
            return batch(ops)

        patched = [(dist, "all_reduce", counted_all_reduce), (dist, "batch_isend_irecv", counted_batch)]
        for name in _FLAT_COLLECTIVE_USERS:
            module = importlib.import_module(name)
            for attr, full_is_output in (("all_gather_single", True), ("reduce_scatter_single", False)):
                if hasattr(module, attr):
                    patched.append((module, attr, flat(getattr(module, attr), full_is_output)))
        originals = [(module, attr, getattr(module, attr)) for module, attr, _ in patched]
        for module, attr, fn in patched:
            setattr(module, attr, fn)
        try:
            yield self
        finally:
            for module, attr, fn in originals:
                setattr(module, attr, fn)
