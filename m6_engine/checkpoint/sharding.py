"""How a rank's local tensors map onto the global tensors a checkpoint stores.

Every model parameter (and persistent buffer) is stored as one global tensor under its global
name, ``model.<name>``; the optimizer's per-parameter tensors as ``optimizer.<name>.<key>``
(``master``, ``exp_avg``, ``exp_avg_sq``), sharded exactly like their parameter. On a tp group of
size t, a local tensor of shape s described by ``param_role(param).tp_dim = d`` is a DTensor on
the mesh's "tp" axis:

    sharded      Shard(d):    global shape s with s[d] * t, rank r holds [r s[d], (r+1) s[d]) along d
    replicated   Replicate(): global shape s, every tp rank holds all of it

The vocab-parallel word embedding (``VocabParallelEmbedding``: rows padded to a multiple of
``vocab_multiple * t``, which differs between tp sizes) is stored without its padding, as the
global (vocab_size, dim) tensor: rank r holds padded rows [r R, (r+1) R), R = padded / t, of which
rows [r R, min((r+1) R, vocab_size)) are real, possibly none. DTensor's even chunks cannot express
that, so it is given to DCP as chunks of the global tensor (global shape, and per chunk its
offsets and size: ``chunks``, which tells each supported torch's DCP in its own way). The padding
rows are never stored; on load they are set to zero.

Because the global tensors do not depend on (tp, pp, dp), any layout loads any checkpoint: DCP
reads the overlap of each stored chunk with each requested one. Duplicates (tp-replicated tensors,
dp replicas, the tied embedding on the first and last stage) are written once: DCP's save planner
keeps one copy of every (key, offset) and spreads the copies it keeps over the ranks.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from m6_engine.checkpoint import chunks
from m6_engine.parallel.data_parallel import DataParallel
from m6_engine.parallel.layers import VocabParallelEmbedding
from m6_engine.parallel.roles import param_role

MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."


@dataclass(frozen=True)
class VocabRows:
    """Where a vocab-parallel weight's real rows sit: the shard starts at global row ``start``,
    holds ``rows`` padded rows, and rows past ``vocab_size`` are padding."""

    vocab_size: int
    start: int
    rows: int

    @property
    def real(self) -> int:
        """Real (non-padding) rows in this shard: a prefix of it, possibly empty."""
        return min(max(self.vocab_size - self.start, 0), self.rows)


@dataclass(frozen=True)
class TensorLayout:
    """How one local tensor relates to its global tensor (see the module docstring)."""

    tp_dim: int | None
    vocab: VocabRows | None = None


def whole_parameters(model: nn.Module, *, write_back: bool = False):
    """A context within which every parameter of ``model`` holds its values: a no-op except for a
    ZeRO-3 stage (``DataParallel.sharded_params``), whose layers are then all gathered (collective
    on "dp"; the whole local stage is materialized meanwhile) and, with ``write_back``, resharded
    from what was written into them (a load)."""
    sharded = model.sharded_params if isinstance(model, DataParallel) else None
    return contextlib.nullcontext() if sharded is None else sharded.materialized(write_back=write_back)


def unwrap(model: nn.Module) -> nn.Module:
    """The stage module inside a DataParallel wrapper (so names carry no ``module.`` prefix)."""
    return model.module if isinstance(model, DataParallel) else model


def _vocab_rows(module: nn.Module) -> dict[int, VocabRows]:
    """id(weight) -> VocabRows for every vocab-parallel embedding of ``module``."""
    return {id(sub.weight): VocabRows(sub.vocab_size, sub.vocab_start, sub.rows_per_rank)
            for sub in module.modules() if isinstance(sub, VocabParallelEmbedding)}


def model_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, TensorLayout]]:
    """Global name -> (local tensor, layout) for the parameters and persistent buffers of a stage.

    A tensor registered under two names on one rank (the tied head at pp = 1) is listed once.
    """
    model = unwrap(model)
    vocab = _vocab_rows(model)
    persistent = model.state_dict(keep_vars=True).keys()
    named = list(model.named_parameters())
    named += [(n, b) for n, b in model.named_buffers() if n in persistent]
    out, seen = {}, set()
    for name, tensor in named:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tp_dim = param_role(tensor).tp_dim
        rows = vocab.get(id(tensor))
        if rows is not None and (tp_dim != 0 or tensor.shape[0] != rows.rows):
            raise ValueError(f"{name}: a vocab-parallel weight must be split along dim 0 into "
                             f"{rows.rows} rows per rank, got tp_dim = {tp_dim} and "
                             f"shape {tuple(tensor.shape)}")
        out[name] = (tensor, TensorLayout(tp_dim, rows))
    return out


def parameters_by_name(tensors: dict) -> dict[str, nn.Parameter]:
    """The trainable parameters among :func:`model_tensors`' entries (what an optimizer updates,
    and so what it is asked about)."""
    return {n: t for n, (t, _) in tensors.items() if isinstance(t, nn.Parameter) and t.requires_grad}


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def global_view(local: torch.Tensor, layout: TensorLayout, tp_mesh: DeviceMesh):
    """The object DCP saves from / loads into for ``local``: it aliases ``local``'s storage.

    Returns a DTensor on ``tp_mesh`` (``state.mesh["tp"]``, built once by the caller: slicing a
    mesh is not free), or for a vocab-parallel weight :func:`chunks.chunked_tensor` of the local
    tensor (global_shape, global_offsets, local_offsets, local_sizes).
    """
    if layout.vocab is not None:
        return chunk_view(local, layout)
    local = local.detach()   # a new tensor object on the same storage
    shape = list(local.shape)
    if layout.tp_dim is None:
        placements = [Replicate()]
    else:
        shape[layout.tp_dim] *= tp_mesh.size()
        placements = [Shard(layout.tp_dim)]
    return DTensor.from_local(local, tp_mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(tuple(shape)))


def chunk_view(local: torch.Tensor, layout: TensorLayout, tp_rank: int = 0, tp_size: int = 1):
    """The whole of ``local`` as :func:`chunks.chunked_tensor` of its global tensor (aliasing its
    storage): the chunk :func:`global_view` gives DCP, without a DTensor. A vocab-parallel
    weight's padding rows are cut off; a tp-sharded tensor sits at tp rank ``tp_rank``'s offset;
    a replicated one at the origin on every rank (DCP keeps one copy, as of a Replicate DTensor).

    What an asynchronous save writes its host snapshot through: a DTensor on a GPU mesh would
    carry its local tensor back to the GPU."""
    origin = (0,) * local.dim()
    return _with_chunks(local, [(origin, tuple(local.shape), origin)], tuple(local.shape), layout,
                        tp_rank, tp_size)


def flat_range_rectangles(first: int, end: int, shape: tuple[int, ...]):
    """Cover the flat elements [first, end) of a row-major tensor of ``shape`` (1 or 2 dims) with
    rectangles. Returns (buffer_shape, buffer_first, rectangles): a buffer of ``buffer_shape`` (the
    rows the range touches) holds the range at its flat elements [buffer_first, buffer_first +
    end - first), and each rectangle is (offset in the buffer, size, offset in the tensor): at
    most three (a partial first row, whole rows, a partial last row). Pure."""
    if not 0 <= first < end <= math.prod(shape):
        raise ValueError(f"flat range [{first}, {end}) is not a non-empty part of a tensor of shape {shape}")
    if len(shape) == 1:
        return (end - first,), 0, [((0,), (end - first,), (first,))]
    if len(shape) != 2:
        raise ValueError(f"optimizer pieces of {len(shape)}-dim tensors are not supported (1 or 2 dims)")
    cols = shape[1]
    r0, r1 = first // cols, (end - 1) // cols
    head, tail = first % cols, end % cols
    if r0 == r1:
        return (1, cols), head, [((0, head), (1, end - first), (r0, head))]
    rectangles = []
    if head:
        rectangles.append(((0, head), (1, cols - head), (r0, head)))
    whole_first, whole_end = (r0 + 1 if head else r0), (r1 if tail else r1 + 1)
    if whole_end > whole_first:
        rectangles.append(((whole_first - r0, 0), (whole_end - whole_first, cols), (whole_first, 0)))
    if tail:
        rectangles.append(((r1 - r0, 0), (1, tail), (r1, 0)))
    return (r1 - r0 + 1, cols), head, rectangles


def pieces_view(buffer: torch.Tensor, ranges: list[tuple[int, int]], placements: list[tuple[int, int]],
                local_shape: tuple[int, ...], layout: TensorLayout, tp_rank: int, tp_size: int) -> torch.Tensor:
    """``buffer`` (shaped by :func:`pieces_buffer_layout`, which gave ``placements``) as the chunks
    (:func:`chunks.chunked_tensor`) that place the flat ranges ``ranges`` of a local tensor of
    ``local_shape`` in its global tensor. What a ZeRO-1 rank saves from and loads into: only its
    own elements, never the whole tensor."""
    rectangles = []
    for (row, _), (first, end) in zip(placements, ranges):
        for in_buffer, size, in_local in flat_range_rectangles(first, end, local_shape)[2]:
            rectangles.append(((in_buffer[0] + row, *in_buffer[1:]), size, in_local))
    return _with_chunks(buffer, rectangles, local_shape, layout, tp_rank, tp_size)


def _with_chunks(buffer: torch.Tensor, rectangles, local_shape: tuple[int, ...], layout: TensorLayout,
                 tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """:func:`chunks.chunked_tensor` of ``buffer`` (aliasing its storage) with the chunks of
    ``rectangles`` ((offset in the buffer, size, offset in the local tensor of ``local_shape``)):
    the local tensor sits at the tp shard's offset along ``layout.tp_dim``, or a vocab-parallel
    weight's at its first row, with the padding rows past ``vocab_size`` left out."""
    global_shape, shift, real_rows = list(local_shape), [0] * len(local_shape), None
    if layout.vocab is not None:
        global_shape[0] = layout.vocab.vocab_size
        shift[0], real_rows = layout.vocab.start, layout.vocab.real
    elif layout.tp_dim is not None:
        global_shape[layout.tp_dim] *= tp_size
        shift[layout.tp_dim] = tp_rank * local_shape[layout.tp_dim]
    global_offsets, local_offsets, local_sizes = [], [], []
    for in_buffer, size, in_local in rectangles:
        if real_rows is not None:   # padding rows are never stored
            size = (min(size[0], real_rows - in_local[0]), *size[1:])
            if size[0] <= 0:
                continue
        global_offsets.append(tuple(o + d for o, d in zip(in_local, shift)))
        local_offsets.append(tuple(in_buffer))
        local_sizes.append(tuple(size))
    return chunks.chunked_tensor(buffer, global_shape, global_offsets, local_offsets, local_sizes)


def pieces_buffer_layout(ranges: list[tuple[int, int]], local_shape: tuple[int, ...]):
    """(buffer shape, [(first buffer row, flat start within that row block)] per range): the
    buffers of :func:`flat_range_rectangles` for each range, stacked along dim 0. Pure."""
    rows, placements, shape = 0, [], None
    for first, end in ranges:
        shape, start, _ = flat_range_rectangles(first, end, local_shape)
        placements.append((rows, start))
        rows += shape[0]
    return (rows, *shape[1:]), placements


def piece_of(buffer: torch.Tensor, placement: tuple[int, int], first: int, end: int) -> torch.Tensor:
    """The flat range [first, end) inside a buffer of :func:`pieces_buffer_layout` (a view)."""
    row, start = placement
    cols = math.prod(buffer.shape[1:])
    return buffer.view(-1)[row * cols + start:row * cols + start + end - first]


def zero_padding(local: torch.Tensor, layout: TensorLayout) -> None:
    """Zero the padding rows of a vocab-parallel tensor (they are never stored)."""
    if layout.vocab is not None:
        with torch.no_grad():
            local[layout.vocab.real:].zero_()


def optimizer_key(name: str, key: str) -> str:
    return f"{OPTIMIZER_PREFIX}{name}.{key}"


def model_key(name: str) -> str:
    return f"{MODEL_PREFIX}{name}"
