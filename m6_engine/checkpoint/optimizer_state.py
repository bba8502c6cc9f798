"""The optimizer's per-parameter tensors in a checkpoint: DCP entries to save from / load into.

Two ways, one stored format (``optimizer.<name>.<key>``, the global tensor sharded like its
parameter, ``sharding``):

- whole tensors (``optimizer.param_states``): every rank holds its tp shard of each state tensor
  in full; dp replicas are written once by DCP's de-duplication. For an optimizer without
  ZeRO-1, whose ranks hold that much anyway.
- pieces (``optimizer.state_pieces``, ZeRO-1): each dp rank saves and loads only the flat element
  ranges it owns (``sharding.pieces_view``: up to three rectangles per range), so a checkpoint
  never gathers the optimizer state (12 bytes per parameter of the stage's tp shard, on every dp
  rank, before); DCP reads any layout's pieces from any other's, whole tensors included. A
  parameter held by two pipeline stages (the tied word embedding) is saved by the first of them
  only, as their pieces need not line up.
"""

from dataclasses import dataclass

import torch

from m6_engine.checkpoint.collective import gather_lists
from m6_engine.checkpoint.folders import CheckpointError
from m6_engine.checkpoint.sharding import (
    global_view, optimizer_key, parameters_by_name, piece_of, pieces_buffer_layout, pieces_view,
    zero_padding,
)


@dataclass
class OptimizerEntries:
    """DCP entries of the optimizer state and how to hand what was read back to the optimizer."""

    entries: dict
    """{optimizer.<name>.<key>: DTensor | checkpointable tensor}."""
    whole: dict | None
    """Whole-tensor way: ``param_states``' {name: {key: tensor}}, the entries' local tensors."""
    pieces: dict | None
    """Pieces way: {name: ([(first, end)], {key: buffer}, [placement])}."""


def uses_pieces(optimizer) -> bool:
    """True for an optimizer with ZeRO-1 sharding that can give its own pieces."""
    return bool(getattr(optimizer, "sharded", False)) and hasattr(optimizer, "state_pieces")


def optimizer_entries(optimizer, tensors: dict, state, *, for_save: bool) -> OptimizerEntries:
    """The optimizer state's DCP entries (``tensors``: :func:`model_tensors` of the stage). For a
    save they hold the current values; for a load, buffers to read into (then
    :func:`hand_back`). Whole tensors: collective over dp (``param_states`` gathers)."""
    named = parameters_by_name(tensors)
    if uses_pieces(optimizer):
        return _piece_entries(optimizer.state_pieces(named), tensors, state, for_save)
    states = optimizer.param_states(named)
    entries = {}
    tp_mesh = state.mesh["tp"]
    for name, per_param in states.items():
        param, layout = _checked(name, tensors)
        for key, value in per_param.items():
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"optimizer state {name}.{key} has shape {tuple(value.shape)}"
                                      f", its parameter {tuple(param.shape)}")
            entries[optimizer_key(name, key)] = global_view(value, layout, tp_mesh)
    return OptimizerEntries(entries, states, None)


def hand_back(optimizer, tensors: dict, read: OptimizerEntries) -> None:
    """Give the optimizer the state DCP read into ``read``'s entries (collective over dp)."""
    named = parameters_by_name(tensors)
    if read.pieces is None:
        for name, per_param in read.whole.items():
            for value in per_param.values():
                zero_padding(value, tensors[name][1])
        optimizer.load_param_states(named, read.whole)
        return
    pieces = {name: [(first, end, {key: piece_of(buffer, placement, first, end)
                                   for key, buffer in buffers.items()})
                     for (first, end), placement in zip(ranges, placements)]
              for name, (ranges, buffers, placements) in read.pieces.items()}
    optimizer.load_state_pieces(named, pieces)


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


def _piece_entries(pieces: dict, tensors: dict, state, for_save: bool) -> OptimizerEntries:
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
            # zeros: the padding rows of a vocab-parallel weight are never read
            buffer = torch.zeros(buffer_shape, dtype=first_value.dtype, device=first_value.device)
            if for_save:
                for (first, end, values), placement in zip(owned, placements):
                    piece_of(buffer, placement, first, end).copy_(values[key])
            buffers[key] = buffer
            if name not in skip:
                entries[optimizer_key(name, key)] = pieces_view(buffer, ranges, placements, shape, layout,
                                                                tp_rank, tp_size)
        read[name] = (ranges, buffers, placements)
    return OptimizerEntries(entries, None, read)


__all__ = ["OptimizerEntries", "hand_back", "optimizer_entries", "uses_pieces"]
