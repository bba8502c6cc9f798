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
"""

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from m6_engine.parallel.collectives import reduce_scatter_single
from m6_engine.parallel.roles import param_role
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
                       align: int = 128) -> BufferLayout:
    """Pure layout of the buffer for gradients of ``numels`` (in buffer order); see module doc."""
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
        if offset - bucket_start >= bucket_numel or i == len(numels) - 1:
            offset = -(-offset // multiple) * multiple   # pad the bucket's end
            bucket_ranges.append((bucket_start, offset))
            members.append(tuple(current))
            bucket_start, current = offset, []
    return BufferLayout(offset, tuple(param_ranges), tuple(bucket_ranges), tuple(members))


class DataParallel(nn.Module):
    """Wraps one model stage; its forward is the stage's. See the module docstring.

    Wrap the stage once it is on its device and in its final dtype: ``main_grad`` views and hooks
    are bound to the parameters as they are now. ``bucket_numel`` trades overlap (small buckets
    start earlier) against per-call overhead.
    """

    GRAD_REDUCE = ("all_reduce", "reduce_scatter")

    def __init__(self, module: nn.Module, state: ParallelState, *,
                 bucket_numel: int = 40_000_000, align: int = 128, grad_reduce: str = "all_reduce"):
        super().__init__()
        if grad_reduce not in self.GRAD_REDUCE:
            raise ValueError(f"DataParallel: grad_reduce must be one of {self.GRAD_REDUCE}, "
                             f"got {grad_reduce!r}")
        self.module = module
        self.group = state.group("dp")
        self.dp_size, self.dp_rank = state.dp_size, state.dp_rank
        self.grad_reduce = grad_reduce
        params = [p for p in module.parameters() if p.requires_grad][::-1]
        if not params:
            raise ValueError("DataParallel: the module has no parameter that requires grad")
        layout = layout_grad_buffer([p.numel() for p in params], bucket_numel, self.dp_size, align)
        self.params, self.layout = tuple(params), layout
        self.grad_buffer = torch.zeros(layout.numel, dtype=torch.float32, device=state.device)
        for p, (start, end) in zip(params, layout.param_ranges):
            role = param_role(p)
            role.main_grad = self.grad_buffer[start:end].view(p.shape)
            role.main_grad_added = functools.partial(self._grad_ready, p)
        self.buckets = tuple(
            Bucket(k, start, end, tuple(params[i] for i in members), self.dp_size)
            for k, ((start, end), members) in enumerate(zip(layout.bucket_ranges, layout.bucket_members)))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        tied_synced = len(state.group_ranks("embedding")) > 1
        self._all_reduced = {b.index for b in self.buckets if grad_reduce == "all_reduce" or (
            tied_synced and any(param_role(p).tied_across_stages for p in b.params))}
        self._ready = [set() for _ in self.buckets]
        self._works: dict[int, object] = {}
        self._sync = True
        self._synced = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

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
        if not self._sync:
            return
        bucket = self._bucket_of[id(param)]
        ready = self._ready[bucket.index]
        if id(param) in ready or bucket.index in self._works:
            raise RuntimeError("DataParallel: a parameter received a second gradient in one synced "
                               "backward, after its bucket may have been sent (a parameter used "
                               "both inside and outside a checkpointed region?)")
        ready.add(id(param))
        if len(ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if self.dp_size == 1:
            self._works[bucket.index] = None
            return
        view = self.grad_buffer[bucket.start:bucket.end]
        view.div_(self.dp_size)
        if bucket.index in self._all_reduced:
            self._works[bucket.index] = dist.all_reduce(view, group=self.group, async_op=True)
            return
        start, end = bucket.shard(self.dp_rank)
        self._works[bucket.index] = reduce_scatter_single(
            self.grad_buffer[start:end], view, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Launch the buckets not launched yet and wait for all: ``main_grad`` is the dp mean (only
        in this rank's shards with ``grad_reduce="reduce_scatter"``; see the module doc)."""
        for bucket in self.buckets:
            if bucket.index not in self._works:
                self._launch(bucket)
        for work in self._works.values():
            if work is not None:
                work.wait()
        self._works.clear()
        for ready in self._ready:
            ready.clear()
        self._synced = True

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` (and drop ``param.grad``) before a step's first backward."""
        if self._works:
            raise RuntimeError("DataParallel: zero_grad_buffer() while all-reduces are in flight; "
                               "call finish_grad_sync() first")
        self.grad_buffer.zero_()
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
        for ready in self._ready:
            ready.clear()
        self._synced = False
