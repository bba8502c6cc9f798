"""The optimizer's per-parameter tensors in a checkpoint: DCP entries to save from / load into.

Stored as ``optimizer.<name>.<key>``: the global tensor, sharded like its parameter (``sharding``).
Every rank saves and loads the flat element ranges of each state tensor it updates, its *pieces*
(:meth:`CheckpointableOptimizer.state_pieces`; ``sharding.pieces_view`` gives DCP up to three
rectangles per range): with ZeRO-1 a dp rank's own share, without it whole parameters, which DCP
writes once for all dp replicas. One path for every layout, and a checkpoint never gathers the
optimizer state. DCP reads any layout's pieces from any other's. A parameter held by two pipeline
stages (the tied word embedding) is saved by the first of them only, as their pieces need not line
up.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from m6_engine.checkpoint.collective import gather_lists
from m6_engine.checkpoint.folders import CheckpointError
from m6_engine.checkpoint.sharding import (
    optimizer_key, parameters_by_name, piece_of, pieces_buffer_layout, pieces_view,
)
from m6_engine.checkpoint.staging import HostStaging

Pieces = dict[str, list[tuple[int, int, dict[str, torch.Tensor]]]]
"""{global name: [(first, end, {state key: fp32 tensor of end - first elements}), ...]}."""


class CheckpointableOptimizer(Protocol):
    """What a checkpoint asks of an optimizer (``m6_engine.optim.MixedPrecisionOptimizer``), with
    ``named = {global name: parameter}`` of the stage."""

    def state_pieces(self, named) -> Pieces:
        """The flat ranges of each parameter this rank updates, with their live state tensors."""

    def load_state_pieces(self, named, pieces: Pieces) -> None:
        """Set those ranges from ``pieces`` (same names and ranges); collective over dp."""

    def scalar_state(self) -> dict:
        """Counters, loss scaler and schedule position as plain numbers."""

    def load_scalar_state(self, scalars: dict) -> None:
        """Inverse of :meth:`scalar_state`."""


@dataclass
class OptimizerEntries:
    """DCP entries of the optimizer state and how to hand what was read back to the optimizer."""

    entries: dict
    """{optimizer.<name>.<key>: checkpointable tensor}."""
    pieces: dict
    """{name: ([(first, end)], {key: buffer}, [placement])}."""


def optimizer_entries(optimizer: CheckpointableOptimizer, tensors: dict, state, *,
                      for_save: bool, staging: HostStaging | None = None) -> OptimizerEntries:
    """The optimizer state's DCP entries (``tensors``: :func:`model_tensors` of the stage). For a
    save they hold copies of the current values, in ``staging``'s host buffers when given (an
    asynchronous save); for a load, buffers to read into (then :func:`hand_back`)."""
    return _piece_entries(optimizer.state_pieces(parameters_by_name(tensors)), tensors, state,
                          for_save, staging)


def hand_back(optimizer: CheckpointableOptimizer, tensors: dict, read: OptimizerEntries) -> None:
    """Give the optimizer the state DCP read into ``read``'s entries (collective over dp)."""
    pieces = {name: [(first, end, {key: piece_of(buffer, placement, first, end)
                                   for key, buffer in buffers.items()})
                     for (first, end), placement in zip(ranges, placements)]
              for name, (ranges, buffers, placements) in read.pieces.items()}
    optimizer.load_state_pieces(parameters_by_name(tensors), pieces)


def _checked(name: str, tensors: dict) -> tuple:
    """(local parameter, layout) of ``name``, or a clear error."""
    if name not in tensors:
        raise CheckpointError(f"the optimizer holds state for {name!r}, which is not a "
                              "parameter of this model stage")
    return tensors[name]


def _saved_elsewhere(names: list[str], pp_rank: int) -> set[str]:
    """Names that a lower pipeline stage also holds (it saves them): collective."""
    first_stage = {}
    for name, stage in gather_lists([(n, pp_rank) for n in names]):
        first_stage[name] = min(stage, first_stage.get(name, stage))
    return {n for n in names if first_stage[n] < pp_rank}


def _piece_buffer(name: str, key: str, shape, like: torch.Tensor, staging: HostStaging | None):
    if staging is not None:   # a save's host snapshot: only the pieces' elements are ever written
        return staging.buffer(optimizer_key(name, key), shape, like.dtype)
    # zeros: the padding rows of a vocab-parallel weight are never read
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _piece_entries(pieces: dict, tensors: dict, state, for_save: bool,
                   staging: HostStaging | None = None) -> OptimizerEntries:
    skip = _saved_elsewhere(sorted(pieces), state.pp_rank) if for_save else set()
    tp_rank, tp_size = state.tp_rank, state.tp_size
    entries, read = {}, {}
    for name, owned in pieces.items():
        param, layout = _checked(name, tensors)
        shape = tuple(param.shape)
        ranges = [(first, end) for first, end, _ in owned]
        buffer_shape, placements = pieces_buffer_layout(ranges, shape)
        buffers = {}
        for key, first_value in owned[0][2].items():
            buffer = _piece_buffer(name, key, buffer_shape, first_value, staging)
            if for_save:
                for (first, end, values), placement in zip(owned, placements):
                    target = piece_of(buffer, placement, first, end)
                    if staging is not None:
                        staging.fill(target, values[key])
                    else:
                        target.copy_(values[key])
            buffers[key] = buffer
            if name not in skip:
                entries[optimizer_key(name, key)] = pieces_view(buffer, ranges, placements, shape, layout,
                                                                tp_rank, tp_size)
        read[name] = (ranges, buffers, placements)
    return OptimizerEntries(entries, read)


__all__ = ["CheckpointableOptimizer", "OptimizerEntries", "Pieces", "hand_back", "optimizer_entries"]
