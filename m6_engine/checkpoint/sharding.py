"""How a rank's local tensors map onto the global tensors a checkpoint stores.

Every model parameter (and persistent buffer) is stored as one global tensor under its global
name, ``model.<name>``; the optimizer's per-parameter tensors as ``optimizer.<name>.<key>``
(``master``, ``exp_avg``, ``exp_avg_sq``), sharded exactly like their parameter. On a tp group of
size t, a local tensor of shape s described by ``param.tensor_parallel_dim = d`` is a DTensor on
the mesh's "tp" axis:

    sharded      Shard(d):    global shape s with s[d] * t, rank r holds [r s[d], (r+1) s[d]) along d
    replicated   Replicate(): global shape s, every tp rank holds all of it

The vocab-parallel word embedding (``VocabParallelEmbedding``: rows padded to a multiple of
``vocab_multiple * t``, which differs between tp sizes) is stored without its padding, as the
global (vocab_size, dim) tensor: rank r holds padded rows [r R, (r+1) R), R = padded / t, of which
rows [r R, min((r+1) R, vocab_size)) are real, possibly none. DTensor's even chunks cannot express
that, so it uses DCP's ``CheckpointableTensor`` protocol (global shape, offsets and sizes attached
to the local tensor). The padding rows are never stored; on load they are set to zero.

Because the global tensors do not depend on (tp, pp, dp), any layout loads any checkpoint: DCP
reads the overlap of each stored chunk with each requested one. Duplicates (tp-replicated tensors,
dp replicas, the tied embedding on the first and last stage) are written once: DCP's save planner
keeps one copy of every (key, offset) and spreads the copies it keeps over the ranks.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from m6_engine.parallel.data_parallel import DataParallel

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


def unwrap(model: nn.Module) -> nn.Module:
    """The stage module inside a DataParallel wrapper (so names carry no ``module.`` prefix)."""
    return model.module if isinstance(model, DataParallel) else model


def _vocab_rows(module: nn.Module) -> dict[int, VocabRows]:
    """id(weight) -> VocabRows for every vocab-parallel embedding (duck-typed on its attributes)."""
    found = {}
    for sub in module.modules():
        if all(hasattr(sub, a) for a in ("vocab_size", "padded_vocab_size", "vocab_start",
                                          "rows_per_rank", "weight")):
            found[id(sub.weight)] = VocabRows(sub.vocab_size, sub.vocab_start, sub.rows_per_rank)
    return found


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
        tp_dim = getattr(tensor, "tensor_parallel_dim", None)
        rows = vocab.get(id(tensor))
        if rows is not None and (tp_dim != 0 or tensor.shape[0] != rows.rows):
            raise ValueError(f"{name}: a vocab-parallel weight must be split along dim 0 into "
                             f"{rows.rows} rows per rank, got tensor_parallel_dim = {tp_dim} and "
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
    mesh is not free), or for a vocab-parallel weight the local tensor carrying the
    CheckpointableTensor fields (global_shape, global_offsets, local_offsets, local_sizes).
    """
    local = local.detach()   # a new tensor object on the same storage
    if layout.vocab is not None:
        rows, rest = layout.vocab, tuple(local.shape[1:])
        local.global_shape = (rows.vocab_size, *rest)
        real = rows.real
        local.global_offsets = ((rows.start,) + (0,) * len(rest),) if real else ()
        local.local_offsets = ((0,) * local.dim(),) if real else ()
        local.local_sizes = ((real, *rest),) if real else ()
        return local
    shape = list(local.shape)
    if layout.tp_dim is None:
        placements = [Replicate()]
    else:
        shape[layout.tp_dim] *= tp_mesh.size()
        placements = [Shard(layout.tp_dim)]
    return DTensor.from_local(local, tp_mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(tuple(shape)))


def zero_padding(local: torch.Tensor, layout: TensorLayout) -> None:
    """Zero the padding rows of a vocab-parallel tensor (they are never stored)."""
    if layout.vocab is not None:
        with torch.no_grad():
            local[layout.vocab.real:].zero_()


def optimizer_key(name: str, key: str) -> str:
    return f"{OPTIMIZER_PREFIX}{name}.{key}"


def model_key(name: str) -> str:
    return f"{MODEL_PREFIX}{name}"
