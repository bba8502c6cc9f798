"""ZeRO: which elements of the flat parameter space each dp rank owns, and the two collectives.

The data-parallel gradient buffer (``parallel.data_parallel``) is cut into buckets whose sizes are
multiples of dp; dp rank d owns the d-th equal slice of every bucket, ``Bucket.shard(d)``. A
parameter occupying buffer range [p0, p1) is owned in pieces: rank d owns its flat elements
[max(p0, s0) - p0, min(p1, s1) - p0) for each shard [s0, s1) of d that overlaps it. The pieces of
all dp ranks partition every parameter exactly once; padding belongs to nobody.

One step with ``optimizer_sharding``: gradients are reduce-scattered (``DataParallel`` with
``grad_reduce="reduce_scatter"``), each rank updates the fp32 masters and Adam moments of its
pieces only (4 + 4 + 4 bytes per owned element: 12/dp bytes per parameter), writes them into the
half-precision parameters, and :class:`ParamBuffer` all-gathers every bucket's parameters from
their owners.

ZeRO-2 (``grad_reduce="reduce_scatter_shard"``) owns the same pieces and does the same step; only
the gradients differ: they are held as this rank's shards alone (``DataParallel.grad_piece``).
ZeRO-3 (``parallel.sharded_params``) owns the same pieces again, writes the updated masters into the
stored parameter shards and all-gathers nothing after the step (each layer is gathered as it runs):
no :class:`ParamBuffer`.
"""

import torch
from m6_engine.parallel.collectives import all_gather_single
from m6_engine.parallel.data_parallel import Bucket, DataParallel, owned_pieces, whole_pieces

__all__ = ["ParamBuffer", "gather_pieces", "owned_pieces", "whole_pieces"]


class ParamBuffer:
    """The model's parameters re-homed as views of one flat buffer laid out like the gradient
    buffer, so each bucket's parameters are all-gathered in place from their dp owners.

    All parameters must share one dtype. After construction ``param.data`` of every parameter in
    ``model.params`` is a view of ``buffer`` (values kept): do not move or cast the model later.
    """

    def __init__(self, model: DataParallel):
        dtypes = {p.dtype for p in model.params}
        if len(dtypes) != 1:
            raise ValueError("optimizer sharding needs one parameter dtype, the model has "
                             f"{sorted(map(str, dtypes))}")
        self.model = model
        first = model.params[0]
        self.buffer = torch.zeros(model.layout.numel, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for p, (start, end) in zip(model.params, model.layout.param_ranges):
                self.buffer[start:end].copy_(p.view(-1))
                p.data = self.buffer[start:end].view(p.shape)

    def all_gather(self) -> None:
        """Every rank's shard of every bucket to every dp rank (collective on "dp")."""
        model = self.model
        if model.dp_size == 1:
            return
        works = []
        for bucket in model.buckets:
            start, end = bucket.shard(model.dp_rank)
            works.append(all_gather_single(self.buffer[bucket.start:bucket.end],
                                           self.buffer[start:end], group=model.group, async_op=True))
        for work in works:
            work.wait()


def gather_pieces(model: DataParallel, pieces: list[tuple[int, int, int]],
                  values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole flat fp32 tensors, one per ``model.params`` entry, assembled from every dp rank's
    ``values`` (``values[k]`` holds this rank's piece ``pieces[k]``); collective on "dp".

    Works bucket by bucket (one bucket-sized temporary at a time) with an in-place all-gather.
    """
    layout, device = model.layout, model.device
    by_param = {}
    for (i, lo, hi), value in zip(pieces, values):
        by_param.setdefault(i, []).append((lo, hi, value))
    out: list[torch.Tensor | None] = [None] * len(model.params)
    for k, ((start, end), members) in enumerate(zip(layout.bucket_ranges, layout.bucket_members)):
        flat = torch.zeros(end - start, dtype=torch.float32, device=device)
        for i in members:
            p0 = layout.param_ranges[i][0] - start
            for lo, hi, value in by_param.get(i, ()):
                flat[p0 + lo:p0 + hi].copy_(value)
        if model.dp_size > 1:
            s0, s1 = Bucket(k, start, end, (), model.dp_size).shard(model.dp_rank)
            all_gather_single(flat, flat[s0 - start:s1 - start], group=model.group)
        for i in members:
            p0, p1 = layout.param_ranges[i]
            out[i] = flat[p0 - start:p1 - start].clone()
    return out
