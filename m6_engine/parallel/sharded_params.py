"""ZeRO-3: each dp rank stores 1/dp of every bucket's parameters; a layer's parameters are
all-gathered just before its forward and again before its backward, and freed after each.

Used by :class:`~m6_engine.parallel.data_parallel.DataParallel` with ``param_units`` (the layers:
every module inside a ``ModuleList`` / ``ModuleDict`` of the stage, :func:`layer_units`). Its
buffer then has one bucket per layer plus one *root* bucket for the parameters outside the layers
(embedding, final norm, head: in use at both ends of the stage's forward, so gathered from the
stage's first forward of a step until the step ends). Between uses a bucket exists only as this rank's
shard, in ``shards`` (the optimizer's fp32 masters are written there and nowhere else).

Gathered storage: each bucket has one full-size tensor, ``full[k]``, whose parameters are views
(``param.data``). Freeing a bucket resizes that tensor's *storage* to zero bytes, gathering resizes
it back and all-gathers into it: the tensors autograd saved for backward are views of that same
storage, so the backward's gather refills them in place, and no copy of a freed layer survives
between forward and backward. A freed parameter keeps its shape over zero bytes: it must not be
read until its bucket is gathered again (``materialized`` for a checkpoint or an inspection).

Schedule, per micro-batch (the next unit's all-gather is launched asynchronously as the current
one starts, so it overlaps the current unit's compute):

    forward of unit k:   gather k (wait its prefetch), prefetch k+1, run, free k
    backward of unit k:  (hook on its output's gradient) gather k, prefetch k-1, run; free k once
                         every parameter of k has its gradient (DataParallel counts them), and
                         its gradient bucket is reduce-scattered as with ZeRO-2.

Why not torch FSDP2 (``fully_shard``): it replaces every parameter by a new DTensor parameter, so
the parallel role each carries (tp dim, tied flag, ``main_grad``) is dropped; it reduce-scatters
``.grad`` into sharded DTensor gradients itself, which neither the fp32 ``main_grad`` buffer nor
the tp layers' fused weight-gradient path (``addmm_`` into ``main_grad``) can take (adding a
DTensor gradient into our buffer fails: "aten.add_.Tensor got mixed torch.Tensor and DTensor"),
and it brings its own mixed precision and optimizer state in place of the O2 masters and the
checkpoint's pieces.
"""

import contextlib

import torch
from torch import nn

from m6_engine.parallel.collectives import all_gather_single

ROOT = -1
"""Unit id of the parameters outside every layer."""


def _in_backward() -> bool:
    """True inside an autograd backward pass (a recomputed forward runs there)."""
    return torch._C._current_graph_task_id() != -1


def layer_units(module: nn.Module) -> list[nn.Module]:
    """The layers of a stage, in forward (registration) order: every direct child of a
    ``ModuleList`` or ``ModuleDict`` inside ``module`` (the block stacks of the toy LM and M6)."""
    units = []
    for child in module.modules():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units.extend(child.children() if isinstance(child, nn.ModuleList) else child.values())
    return units


class ShardedParameters:
    """The parameters of a DataParallel stage sharded over dp (module docstring).

    ``model``: the DataParallel wrapper (its buckets are one per unit: ``unit_of_bucket``);
    ``units``: the layer modules in forward order. Parameters keep their values; afterwards only
    ``shards`` holds them between uses.
    """

    def __init__(self, model, units: list[nn.Module], unit_of_bucket: list[int]):
        dtypes = {p.dtype for p in model.params}
        if len(dtypes) != 1:
            raise ValueError("ZeRO-3 needs one parameter dtype, the model has "
                             f"{sorted(map(str, dtypes))}")
        self.model, self.units = model, units
        self.unit_of_bucket = unit_of_bucket
        self.bucket_of_unit = {u: k for k, u in enumerate(unit_of_bucket)}
        self.root_bucket = self.bucket_of_unit.get(ROOT)
        dtype, device = model.params[0].dtype, model.params[0].device
        self._element = torch.empty((), dtype=dtype).element_size()
        self._offsets, offset = [], 0
        for bucket in model.buckets:
            self._offsets.append(offset)
            offset += bucket.numel // model.dp_size
        self.shards = torch.zeros(offset, dtype=dtype, device=device)
        self.full = [torch.zeros(b.numel, dtype=dtype, device=device) for b in model.buckets]
        self._gathered = [True] * len(model.buckets)
        self._works: dict[int, object] = {}
        self._arrived = [set() for _ in model.buckets]
        self.peak_gathered_numel = 0
        """The most parameter elements gathered at once so far (for tests and benches)."""
        ranges = model.layout.param_ranges
        with torch.no_grad():
            for index, p in enumerate(model.params):
                bucket = model._bucket_of[id(p)]
                p0, p1 = (r - bucket.start for r in ranges[index])
                full = self.full[bucket.index]
                full[p0:p1].copy_(p.detach().view(-1))
                p.data = full[p0:p1].view(p.shape)
            for bucket in model.buckets:
                self.shard(bucket.index).copy_(self._own(bucket.index))
        for k in range(len(model.buckets)):
            self._free(k)
        self._hooks = []
        for position, unit in enumerate(units):
            self._hooks.append(unit.register_forward_pre_hook(
                lambda module, args, position=position: self._before_forward(position)))
            self._hooks.append(unit.register_forward_hook(
                lambda module, args, output, position=position: self._after_forward(position, output)))
        if self.root_bucket is not None:
            # Interleaved 1F1B runs a StageChunks' chunks, never its own forward: each chunk's
            # forward gathers the root (a no-op once gathered).
            for entry in getattr(model.module, "chunks", (model.module,)):
                self._hooks.append(entry.register_forward_pre_hook(
                    lambda module, args: self.gather(self.root_bucket)))

    # ----- storage ---------------------------------------------------------------------------

    def shard(self, index: int) -> torch.Tensor:
        """This rank's stored shard of bucket ``index`` (what the optimizer writes)."""
        size = self.model.buckets[index].numel // self.model.dp_size
        return self.shards[self._offsets[index]:self._offsets[index] + size]

    def param_piece(self, index: int, first: int, end: int) -> torch.Tensor:
        """Flat elements [first, end) of ``model.params[index]`` in ``shards`` (they must lie in
        this rank's shard of its bucket: an owned piece, ``parallel.data_parallel.owned_pieces``)."""
        model = self.model
        bucket = model._bucket_of[id(model.params[index])]
        p0 = model.layout.param_ranges[index][0]
        s0, s1 = bucket.shard(model.dp_rank)
        if not s0 <= p0 + first <= p0 + end <= s1:
            raise ValueError(f"ZeRO-3: elements [{first}, {end}) of parameter {index} are not in this "
                             f"rank's shard [{s0}, {s1}) of bucket {bucket.index}")
        return self.shard(bucket.index)[p0 + first - s0:p0 + end - s0]

    def _own(self, index: int) -> torch.Tensor:
        bucket = self.model.buckets[index]
        s0, s1 = bucket.shard(self.model.dp_rank)
        return self.full[index][s0 - bucket.start:s1 - bucket.start]

    def gathered_numel(self) -> int:
        """Parameter elements gathered now (full-size buckets with storage)."""
        return sum(b.numel for b, g in zip(self.model.buckets, self._gathered) if g)

    def gather(self, index: int, wait: bool = True) -> None:
        """Make bucket ``index``'s parameters whole (collective on "dp"); ``wait=False`` launches
        the all-gather and returns (a later ``gather`` or ``_free`` waits for it)."""
        if not self._gathered[index]:
            full = self.full[index]
            full.untyped_storage().resize_(full.numel() * self._element)
            self._gathered[index] = True
            self.peak_gathered_numel = max(self.peak_gathered_numel, self.gathered_numel())
            if self.model.dp_size == 1:
                full.copy_(self.shard(index))
            else:
                self._works[index] = all_gather_single(full, self.shard(index),
                                                       group=self.model.group, async_op=True)
        if wait and index in self._works:
            self._works.pop(index).wait()

    def _free(self, index: int) -> None:
        if index in self._works:
            self._works.pop(index).wait()
        if self._gathered[index]:
            self.full[index].untyped_storage().resize_(0)
            self._gathered[index] = False

    # ----- the schedule ----------------------------------------------------------------------

    def _bucket(self, position: int) -> int | None:
        return self.bucket_of_unit.get(position) if 0 <= position < len(self.units) else None

    def _prefetch(self, position: int) -> None:
        bucket = self._bucket(position)
        if bucket is not None:
            self.gather(bucket, wait=False)

    def _before_forward(self, position: int) -> None:
        self.gather(self._bucket(position))
        if not _in_backward():
            self._prefetch(position + 1)

    def _after_forward(self, position: int, output) -> None:
        bucket = self._bucket(position)
        if _in_backward():
            # Recomputation (activation checkpointing) inside the unit's backward: the gradient
            # hook gathered it, and its backward is about to use the parameters.
            return
        if torch.is_grad_enabled():
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
            hooked = [t for t in tensors if t.requires_grad]
            if hooked:
                hooked[0].register_hook(lambda grad: self._before_backward(position))
        self._free(bucket)

    def _before_backward(self, position: int) -> None:
        self.gather(self._bucket(position))
        self._prefetch(position - 1)

    def grad_arrived(self, index: int, param: nn.Parameter) -> None:
        """DataParallel: ``param`` of bucket ``index`` has its gradient of this backward; once all
        have, the bucket's parameters are freed (its backward no longer needs them)."""
        if index == self.root_bucket:
            # The root stays gathered until the step ends (after_step): a micro-batch still in
            # flight (1F1B warm-up, interleaved chunks) may need the head or a tied weight in its
            # backward after an earlier micro-batch's gradients are all in; and every forward
            # gathers it again anyway, so freeing it in between would not lower the peak.
            return
        arrived = self._arrived[index]
        arrived.add(id(param))
        if len(arrived) == len(self.model.buckets[index].params):
            arrived.clear()
            self._free(index)

    def after_step(self) -> None:
        """Release what is still gathered (a forward without backward) once the step is done."""
        for index in range(len(self.full)):
            self._free(index)
        for arrived in self._arrived:
            arrived.clear()

    @contextlib.contextmanager
    def materialized(self, *, write_back: bool = False):
        """Every parameter whole within (collective on "dp"), e.g. for a checkpoint; with
        ``write_back`` this rank's shards are then taken from them (what a load wrote)."""
        for index in range(len(self.full)):
            self.gather(index, wait=False)
        for index in range(len(self.full)):
            self.gather(index)
        try:
            yield
        finally:
            if write_back:
                with torch.no_grad():
                    for index in range(len(self.full)):
                        self.shard(index).copy_(self._own(index))
            self.after_step()
