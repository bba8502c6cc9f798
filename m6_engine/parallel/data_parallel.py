"""Data-parallel gradients: one contiguous fp32 buffer, bucketed all-reduce overlapped with backward.

Layout (what an optimizer, or ZeRO-1 later, relies on):
- Parameters that require grad are laid out in *reverse registration order* (roughly the order
  backward produces their gradients) in one fp32 buffer ``grad_buffer``; each parameter's slice
  is exposed as ``param_role(param).main_grad`` (a view of the parameter's shape; ``parallel.roles``).
- The buffer is cut into buckets of consecutive parameters: a bucket is closed once it holds at
  least ``bucket_numel`` elements. Each bucket's end is padded so its size is a multiple of
  ``dp * align``: its dp shards, ``Bucket.shard(dp_rank)``, are equal and ``align``-element
  aligned. (ZeRO-1 replaces the bucket all-reduce by a reduce-scatter into the shard, steps the
  optimizer on the shard and all-gathers the parameters.)
- ``params`` (buffer order) and ``layout`` (the :class:`BufferLayout`) describe the buffer.

Flow of one optimizer step: ``zero_grad_buffer()``; backward of every micro-batch, all but the
last inside ``no_sync()``. A post-accumulate-grad hook adds each ``param.grad`` into its
``main_grad`` (in fp32, whatever the parameter's dtype) and frees ``param.grad``; a tp linear
layer's backward may instead add its weight gradient there itself and say so
(``ParamRole.main_grad_added``: gradient-accumulation fusion). Outside
``no_sync`` a bucket whose parameters all have their gradient is pre-divided by dp and its sum
all-reduce launched asynchronously while backward continues; ``finish_grad_sync()`` launches what
is left and waits, leaving the dp-mean gradient in ``main_grad``. Optimizers read ``main_grad``.

``grad_reduce="reduce_scatter"`` (ZeRO-1, ``m6_engine.optim.zero``): a ready bucket is instead
reduce-scattered in place, so after ``finish_grad_sync()`` only this rank's shard of each bucket,
``buffer[Bucket.shard(dp_rank)]``, holds the dp mean; the rest of the buffer holds this rank's own
pre-divided gradient and must not be read. Exception: a bucket holding a weight tied across
pipeline stages is still all-reduced when the embedding group spans two stages, because
``parallel.tied`` then sums the *whole* tied gradient over the two stages, whose buffers shard it
at different offsets.

``grad_reduce="reduce_scatter_shard"`` (ZeRO-2): no full-size gradient buffer. ``grad_buffer``
holds only this rank's shard of every bucket, back to back (1/dp of the layout; a bucket with a
tied weight, when the embedding group spans two stages, is held whole as above, for the same
reason). A bucket's full-size gradient lives in a bucket-sized *staging* tensor that is created by
the first read of one of its parameters' ``main_grad`` (``ParamRole.main_grad`` asks the wrapper
each time, so the hook and the fused tp backwards always write into the live one), and is
released once its reduce-scatter has finished and the shard part has been added into
``grad_buffer``. So at most the buckets backward is writing or sending are full size at a time.
The price: ``no_sync`` cannot defer anything (a deferred bucket would have to stay full size), so
every micro-batch's backward reduce-scatters every bucket (M reduce-scatters per step instead of
one with M micro-batches, each of 1/dp of the all-reduce's traffic: DeepSpeed's ZeRO-2
behaviour); only the whole-held tied buckets still wait for the last micro-batch. After
``finish_grad_sync()`` the dp-mean shard of bucket k is :meth:`DataParallel.shard_grad` ``(k)``
and ``main_grad`` of an untied parameter must not be read (it raises).

``param_units`` (ZeRO-3, with "reduce_scatter_shard"; ``data_parallel_options(3, stage)``): one
bucket per layer module plus one for the parameters outside every layer, and the parameters
themselves stored as dp shards and gathered layer by layer (``parallel.sharded_params``).
"""

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from m6_engine.parallel.collectives import reduce_scatter_single
from m6_engine.parallel.roles import param_role
from m6_engine.parallel.sharded_params import ROOT, ShardedParameters, layer_units
from m6_engine.parallel.state import ParallelState


@dataclass(frozen=True)
class Bucket:
    """Elements [start, end) of the grad buffer; ``params`` are in buffer order."""

    index: int
    start: int
    end: int
    params: tuple[nn.Parameter, ...] = field(repr=False)
    dp_size: int = 1

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard(self, dp_rank: int) -> tuple[int, int]:
        """Buffer range [start, end) of dp rank ``dp_rank``'s equal share of this bucket."""
        size = self.numel // self.dp_size
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


@dataclass(frozen=True)
class BufferLayout:
    """Where each gradient lives: ``param_ranges[i]`` for the i-th numel given, bucket bounds."""

    numel: int
    param_ranges: tuple[tuple[int, int], ...]
    bucket_ranges: tuple[tuple[int, int], ...]
    bucket_members: tuple[tuple[int, ...], ...]


def layout_grad_buffer(numels: list[int], bucket_numel: int, dp_size: int,
                       align: int = 128, groups: list[int] | None = None) -> BufferLayout:
    """Pure layout of the buffer for gradients of ``numels`` (in buffer order); see module doc.
    With ``groups`` (a group id per parameter, each group consecutive) a bucket is one group,
    whatever its size (ZeRO-3: one bucket per layer)."""
    if groups is not None and len(groups) != len(numels):
        raise ValueError(f"{len(groups)} groups for {len(numels)} parameters")
    if bucket_numel < 1 or dp_size < 1 or align < 1:
        raise ValueError(f"bucket_numel = {bucket_numel}, dp_size = {dp_size} and align = {align} "
                         "must all be >= 1")
    multiple = dp_size * align
    param_ranges, bucket_ranges, members = [], [], []
    offset, bucket_start, current = 0, 0, []
    for i, n in enumerate(numels):
        param_ranges.append((offset, offset + n))
        offset += n
        current.append(i)
        closes = (offset - bucket_start >= bucket_numel if groups is None
                  else i == len(numels) - 1 or groups[i + 1] != groups[i])
        if closes or i == len(numels) - 1:
            offset = -(-offset // multiple) * multiple   # pad the bucket's end
            bucket_ranges.append((bucket_start, offset))
            members.append(tuple(current))
            bucket_start, current = offset, []
    return BufferLayout(offset, tuple(param_ranges), tuple(bucket_ranges), tuple(members))


def owned_pieces(layout: BufferLayout, dp_size: int, dp_rank: int) -> list[tuple[int, int, int]]:
    """(parameter index, first, end): the flat element ranges of the parameters (indices into the
    layout's ``param_ranges``) that dp rank ``dp_rank`` owns, in buffer order. Pure."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
    pieces = []
    for k, ((start, end), members) in enumerate(zip(layout.bucket_ranges, layout.bucket_members)):
        s0, s1 = Bucket(k, start, end, (), dp_size).shard(dp_rank)
        for i in members:
            p0, p1 = layout.param_ranges[i]
            lo, hi = max(p0, s0), min(p1, s1)
            if lo < hi:
                pieces.append((i, lo - p0, hi - p0))
    return pieces


def whole_pieces(layout: BufferLayout) -> list[tuple[int, int, int]]:
    """Every parameter as one piece: what a rank owns without sharding."""
    return [(i, 0, end - start) for i, (start, end) in enumerate(layout.param_ranges)]


def _group_by_unit(params: list[nn.Parameter], units: list[nn.Module]):
    """(params reordered so each unit's are consecutive, unit id per parameter): units keep the
    order in which ``params`` (buffer order) first reaches them; parameters outside every unit
    form the unit ``ROOT``."""
    unit_of = {id(p): position for position, unit in enumerate(units) for p in unit.parameters()}
    order: dict[int, list[nn.Parameter]] = {}
    for p in params:
        order.setdefault(unit_of.get(id(p), ROOT), []).append(p)
    grouped = [(unit, p) for unit, members in order.items() for p in members]
    return [p for _, p in grouped], [unit for unit, _ in grouped]


def data_parallel_options(zero_stage: int, module: nn.Module) -> dict:
    """The keyword arguments of :class:`DataParallel` for ``zero_stage`` (0 to 3) of ``module``:
    ``grad_reduce``, and with stage 3 ``param_units`` (its layers, ``layer_units``)."""
    if zero_stage == 3:
        return {"grad_reduce": "reduce_scatter_shard", "param_units": layer_units(module)}
    return {"grad_reduce": grad_reduce_for(zero_stage)}


GRAD_REDUCE_OF_STAGE = {0: "all_reduce", 1: "reduce_scatter", 2: "reduce_scatter_shard",
                        3: "reduce_scatter_shard"}
"""``DataParallel``'s ``grad_reduce`` for each ZeRO stage (``OptimizerConfig.zero_stage``)."""


def grad_reduce_for(zero_stage: int) -> str:
    """The ``grad_reduce`` a stage wrapped for ``zero_stage`` needs (stage 3 also needs
    ``param_units``: :func:`data_parallel_options`)."""
    if zero_stage not in GRAD_REDUCE_OF_STAGE:
        raise ValueError(f"OptimizerConfig.zero_stage = {zero_stage!r}: DataParallel implements ZeRO "
                         f"stages {sorted(GRAD_REDUCE_OF_STAGE)}")
    return GRAD_REDUCE_OF_STAGE[zero_stage]


class DataParallel(nn.Module):
    """Wraps one model stage; its forward is the stage's. See the module docstring.

    Wrap the stage once it is on its device and in its final dtype: ``main_grad`` views and hooks
    are bound to the parameters as they are now. ``bucket_numel`` trades overlap (small buckets
    start earlier) against per-call overhead.
    """

    GRAD_REDUCE = ("all_reduce", "reduce_scatter", "reduce_scatter_shard")
    STAGED_IN_FLIGHT = 2
    """ZeRO-2: reduce-scatters of staging tensors allowed in flight before the oldest is waited for."""

    def __init__(self, module: nn.Module, state: ParallelState, *,
                 bucket_numel: int = 40_000_000, align: int = 128, grad_reduce: str = "all_reduce",
                 param_units: list[nn.Module] | None = None):
        super().__init__()
        if grad_reduce not in self.GRAD_REDUCE:
            raise ValueError(f"DataParallel: grad_reduce must be one of {self.GRAD_REDUCE}, "
                             f"got {grad_reduce!r}")
        if param_units is not None and grad_reduce != "reduce_scatter_shard":
            raise ValueError("DataParallel: param_units (ZeRO-3) needs grad_reduce="
                             f"'reduce_scatter_shard', got {grad_reduce!r}")
        self.module = module
        self.group = state.group("dp")
        self.dp_size, self.dp_rank = state.dp_size, state.dp_rank
        self.grad_reduce = grad_reduce
        self.device = state.device
        params = [p for p in module.parameters() if p.requires_grad][::-1]
        if not params:
            raise ValueError("DataParallel: the module has no parameter that requires grad")
        groups = None
        if param_units is not None:
            params, groups = _group_by_unit(params, param_units)
        layout = layout_grad_buffer([p.numel() for p in params], bucket_numel, self.dp_size, align,
                                    groups)
        self.params, self.layout = tuple(params), layout
        self.buckets = tuple(
            Bucket(k, start, end, tuple(params[i] for i in members), self.dp_size)
            for k, ((start, end), members) in enumerate(zip(layout.bucket_ranges, layout.bucket_members)))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        tied_synced = len(state.group_ranks("embedding")) > 1
        self._all_reduced = {b.index for b in self.buckets if grad_reduce == "all_reduce" or (
            tied_synced and any(param_role(p).tied_across_stages for p in b.params))}
        self.sharded_grads = grad_reduce == "reduce_scatter_shard"
        # Where each bucket's gradient is held between steps: (offset in grad_buffer, size); the
        # whole bucket unless ZeRO-2 keeps only this rank's shard of it.
        self._held, offset = [], 0
        for b in self.buckets:
            staged = self.sharded_grads and b.index not in self._all_reduced
            size = b.numel // self.dp_size if staged else b.numel
            self._held.append((offset if self.sharded_grads else b.start, size))
            offset += size
        self.grad_buffer = torch.zeros(offset if self.sharded_grads else layout.numel,
                                       dtype=torch.float32, device=state.device)
        self._staging: dict[int, torch.Tensor] = {}     # ZeRO-2: bucket index -> full-size gradient
        self.peak_staging_numel = 0
        """ZeRO-2: the most elements the staging tensors held at once so far (for tests, benches)."""
        for i, p in enumerate(params):
            role = param_role(p)
            role.main_grad_source = functools.partial(self._main_grad, p, layout.param_ranges[i])
            role.main_grad_added = functools.partial(self._grad_ready, p)
        self._ready = [set() for _ in self.buckets]
        self._works: dict[int, object] = {}
        self._launched_final: set[int] = set()   # buckets whose last reduction of the step was launched
        self._reduced_hooks: list = []
        self._sync = True
        self._synced = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self.sharded_params = None
        """ZeRO-3 (``param_units`` given): the :class:`ShardedParameters` storing the parameters."""
        if param_units is not None:
            unit_of_bucket = [groups[members[0]] for members in layout.bucket_members]
            self.sharded_params = ShardedParameters(self, list(param_units), unit_of_bucket)

    def _held_whole(self, bucket: Bucket) -> bool:
        return not self.sharded_grads or bucket.index in self._all_reduced

    def _main_grad(self, param: nn.Parameter, param_range: tuple[int, int]) -> torch.Tensor:
        """The tensor ``param``'s gradient accumulates in now (``ParamRole.main_grad``)."""
        bucket = self._bucket_of[id(param)]
        p0, p1 = param_range
        if self._held_whole(bucket):
            offset = self._held[bucket.index][0] - bucket.start
            return self.grad_buffer[offset + p0:offset + p1].view(param.shape)
        if self._synced:
            raise RuntimeError("DataParallel (ZeRO-2): main_grad of an untied parameter is not held "
                               "after finish_grad_sync(); read shard_grad(bucket) instead")
        return self._staging_of(bucket)[p0 - bucket.start:p1 - bucket.start].view(param.shape)

    def _staging_of(self, bucket: Bucket) -> torch.Tensor:
        """ZeRO-2: the bucket's live full-size gradient, created zeroed on its first gradient. A
        reduce-scatter of the bucket still in flight (an earlier micro-batch) is finished first:
        its staging must not take new gradients."""
        if bucket.index in self._works:
            self._retire(bucket.index)
        staging = self._staging.get(bucket.index)
        if staging is None:
            staging = torch.zeros(bucket.numel, dtype=torch.float32, device=self.grad_buffer.device)
            self._staging[bucket.index] = staging
            self.peak_staging_numel = max(self.peak_staging_numel,
                                          sum(t.numel() for t in self._staging.values()))
        return staging

    def shard_grad(self, index: int) -> torch.Tensor:
        """This rank's shard of bucket ``index`` in the buffer that holds it between steps: after
        ``finish_grad_sync()`` its dp-mean gradient (with ``grad_reduce`` "reduce_scatter" or
        "reduce_scatter_shard"; with "all_reduce" the same range of the whole mean)."""
        bucket = self.buckets[index]
        offset, size = self._held[index]
        if size == bucket.numel:
            s0, s1 = bucket.shard(self.dp_rank)
            return self.grad_buffer[offset + s0 - bucket.start:offset + s1 - bucket.start]
        return self.grad_buffer[offset:offset + size]

    def grad_piece(self, index: int, first: int, end: int) -> torch.Tensor:
        """Flat elements [first, end) of parameter ``params[index]``'s gradient, as a view of the
        persistent buffer; with ZeRO-2 only this rank's pieces (:func:`owned_pieces`) or
        those of a whole-held bucket are there."""
        bucket = self._bucket_of[id(self.params[index])]
        p0 = self.layout.param_ranges[index][0]
        if self._held_whole(bucket):
            offset = self._held[bucket.index][0] - bucket.start
            return self.grad_buffer[offset + p0 + first:offset + p0 + end]
        s0, s1 = bucket.shard(self.dp_rank)
        if not s0 <= p0 + first <= p0 + end <= s1:
            raise ValueError(f"DataParallel (ZeRO-2): elements [{first}, {end}) of parameter {index} "
                             f"are not inside this rank's shard [{s0}, {s1}) of bucket {bucket.index}")
        return self.shard_grad(bucket.index)[p0 + first - s0:p0 + end - s0]

    def reduced_pieces(self) -> list[tuple[int, int, int]]:
        """(parameter index, first, end) of the gradient elements that hold the dp mean after
        ``finish_grad_sync()``: every parameter whole with "all_reduce", this rank's owned pieces
        with the ZeRO reductions (what the optimizer reads through :meth:`grad_piece`)."""
        if self.grad_reduce == "all_reduce":
            return whole_pieces(self.layout)
        return owned_pieces(self.layout, self.dp_size, self.dp_rank)

    def grad_buffer_bytes(self) -> int:
        """Bytes of gradient storage this rank holds between steps (the staging tensors of ZeRO-2
        come and go inside backward: ``peak_staging_numel``)."""
        return self.grad_buffer.nbytes

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients into the buffer without communicating (all but the last micro-batch)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    @property
    def buckets_in_flight(self) -> int:
        """Buckets whose all-reduce has been launched and not yet waited for."""
        return len(self._works)

    def _on_grad(self, param: nn.Parameter) -> None:
        if param.grad is None:   # a fused backward added it to main_grad and said so already
            return
        self._check_not_synced()
        param_role(param).main_grad.add_(param.grad)         # in fp32, whatever param's dtype
        param.grad = None
        self._grad_ready(param)

    def _check_not_synced(self) -> None:
        if self._synced:
            raise RuntimeError("DataParallel: a gradient arrived after finish_grad_sync(); call "
                               "zero_grad_buffer() before the next step's backward")

    def _grad_ready(self, param: nn.Parameter) -> None:
        """``param``'s gradient of this backward is in main_grad (added by the hook, or by a fused
        backward: ``ParamRole.main_grad_added``): launch its bucket once all of them are."""
        self._check_not_synced()
        bucket = self._bucket_of[id(param)]
        if self.sharded_params is not None:
            self.sharded_params.grad_arrived(bucket.index, param)
        staged = not self._held_whole(bucket)
        if not self._sync and not staged:
            return
        ready = self._ready[bucket.index]
        if not staged and (id(param) in ready or bucket.index in self._works):
            raise RuntimeError("DataParallel: a parameter received a second gradient in one synced "
                               "backward, after its bucket may have been sent (a parameter used "
                               "both inside and outside a checkpointed region?)")
        # Staged (ZeRO-2): a second gradient before the launch is still in the staging tensor and
        # one after it opens a new one; every staging tensor is sent, so either is counted.
        ready.add(id(param))
        if len(ready) == len(bucket.params):
            self._launch(bucket)

    def add_reduced_hook(self, hook) -> None:
        """Call ``hook(bucket_index)`` once per step for each bucket, as soon as its last reduction
        of the step has finished (inside backward where the collective completed early, else in
        :meth:`finish_grad_sync`): its dp-mean gradient pieces (:meth:`grad_piece`) are final from
        then on, except for what ``parallel.grad_sync`` sums afterwards (sequence-parallel and tied
        parameters). ZeRO-Offload streams gradients to the host from here."""
        self._reduced_hooks.append(hook)

    def bucket_of(self, index: int) -> int:
        """The bucket holding parameter ``params[index]``."""
        return self._bucket_of[id(self.params[index])].index

    def _launch(self, bucket: Bucket) -> None:
        self._ready[bucket.index].clear()
        if self._sync:
            self._launched_final.add(bucket.index)
        if self._reduced_hooks:
            self._retire_finished()
        if not self._held_whole(bucket):
            self._launch_staged(bucket)
            return
        if self.dp_size == 1:
            self._works[bucket.index] = None
            return
        offset = self._held[bucket.index][0]
        view = self.grad_buffer[offset:offset + bucket.numel]
        view.div_(self.dp_size)
        if bucket.index in self._all_reduced:
            self._works[bucket.index] = dist.all_reduce(view, group=self.group, async_op=True)
            return
        start, end = bucket.shard(self.dp_rank)
        self._works[bucket.index] = reduce_scatter_single(
            self.grad_buffer[start:end], view, group=self.group, async_op=True)

    def _launch_staged(self, bucket: Bucket) -> None:
        """ZeRO-2: reduce-scatter the staging tensor into its own shard range (in place); the
        result is added into the held shard when the work is retired."""
        self._retire_finished()
        staging = self._staging.get(bucket.index)
        if staging is None:      # no gradient reached this bucket since its last launch
            return
        if self.dp_size == 1:
            self._works[bucket.index] = None
            return
        staging.div_(self.dp_size)
        s0, s1 = bucket.shard(self.dp_rank)
        self._works[bucket.index] = reduce_scatter_single(
            staging[s0 - bucket.start:s1 - bucket.start], staging, group=self.group, async_op=True)
        # A bound on the full-size gradients alive at once that does not hang on the network's
        # speed: beyond STAGED_IN_FLIGHT sent buckets, wait for the oldest.
        in_flight = [k for k in self._works if k in self._staging]
        for index in in_flight[:max(0, len(in_flight) - self.STAGED_IN_FLIGHT)]:
            self._retire(index)

    def _retire(self, index: int) -> None:
        """Wait for bucket ``index``'s collective; with a staging tensor, add its shard into the
        held one and release it."""
        work = self._works.pop(index)
        if work is not None:
            work.wait()
        staging = self._staging.pop(index, None)
        if staging is not None:
            bucket = self.buckets[index]
            s0, s1 = bucket.shard(self.dp_rank)
            self.shard_grad(index).add_(staging[s0 - bucket.start:s1 - bucket.start])
        if index in self._launched_final:
            for hook in self._reduced_hooks:
                hook(index)

    def _retire_finished(self) -> None:
        """Retire the collectives that are done (a cheap poll, no wait): free the staging tensors
        whose reduce-scatter finished, and with reduced hooks also the whole-held buckets."""
        for index in [k for k, w in self._works.items() if (k in self._staging or self._reduced_hooks)
                      and (w is None or w.is_completed())]:
            self._retire(index)

    def finish_grad_sync(self) -> None:
        """Launch the buckets not launched yet and wait for all: ``main_grad`` is the dp mean (only
        in this rank's shards with ``grad_reduce="reduce_scatter"``, and only in ``grad_buffer``'s
        shards with "reduce_scatter_shard"; see the module doc)."""
        for bucket in self.buckets:
            # Not launched in this synced backward (retired early or still in flight: skip).
            # ZeRO-2: a no-op for a bucket without staging.
            if bucket.index not in self._works and (bucket.index not in self._launched_final
                                                    or not self._held_whole(bucket)):
                self._launch(bucket)
        for index in list(self._works):
            self._retire(index)
        for ready in self._ready:
            ready.clear()
        if self.sharded_params is not None:
            self.sharded_params.after_step()
        self._synced = True

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` (and drop ``param.grad``) before a step's first backward."""
        if self._works:
            raise RuntimeError("DataParallel: zero_grad_buffer() while all-reduces are in flight; "
                               "call finish_grad_sync() first")
        self.grad_buffer.zero_()
        self._staging.clear()
        self._launched_final.clear()
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
        for ready in self._ready:
            ready.clear()
        self._synced = False
