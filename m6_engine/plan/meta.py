"""Build the real model of every rank of a layout on the meta device, in one process.

A model stage needs a :class:`ParallelState` only for its sizes and ranks (tp, pp and their
ranks decide which layers and which shard it builds) and for the tp group handle it stores.
:func:`stand_in_state` is such a value for any rank of any layout, built in a process whose only
process group has one rank: the layers keep that group, so a forward runs every op on this rank's
shard shapes but *communicates nothing* (with tp > 1 its values are not the sharded model's,
its shapes and saved tensors are). Uses: counting the parameters of each rank of a 96-GPU layout
without 96 GPUs (:func:`meta_stage`), and measuring one rank's saved activations (tests).
"""

from dataclasses import dataclass

import torch

from m6_engine.config import ModelConfig
from m6_engine.parallel.roles import param_role
from m6_engine.parallel.state import GROUP_NAMES, ParallelState, RankLayout


def stand_in_state(tp: int, pp: int, dp: int, *, pp_rank: int, tp_rank: int, group,
                   device: str | torch.device = "meta") -> ParallelState:
    """The ParallelState of rank (pp_rank, dp 0, tp_rank) of a (pp, dp, tp) layout whose every
    group is ``group`` (a one-rank process group of this process). Sizes and ranks are the
    layout's; the process groups are not: shape-level use only (module docstring)."""
    layout = RankLayout(world_size=tp * pp * dp, tp=tp, pp=pp, dp=dp)
    rank = layout.rank_of(pp_rank, 0, tp_rank)
    return ParallelState(layout=layout, rank=rank, device=torch.device(device), mesh=None,
                         groups={name: group for name in GROUP_NAMES})


@dataclass(frozen=True)
class RankParameters:
    """One rank's parameters as the model builds them."""

    pp_rank: int
    tp_rank: int
    shapes: dict
    """name -> shape."""
    count: int
    """Elements on this rank (the tied head copy included)."""
    unique: int
    """Elements this rank contributes when each parameter of the model is counted once: sharded
    ones on every tp rank, replicated ones on tp rank 0 only, the last stage's tied copy never."""
    numels: tuple[int, ...] = ()
    """Elements of each parameter in registration order (what DataParallel lays out, reversed)."""


def meta_stage(config: ModelConfig, tp: int, pp: int, dp: int, pp_rank: int, tp_rank: int,
               group, virtual_stages: int = 1) -> RankParameters:
    """Build stage ``pp_rank``'s tp rank ``tp_rank`` (its ``virtual_stages`` chunks as the Trainer
    does, ``StageChunks``) on the meta device and count its parameters."""
    from m6_engine.model import M6Model
    from m6_engine.model.m6 import StageChunks

    state = stand_in_state(tp, pp, dp, pp_rank=pp_rank, tp_rank=tp_rank, group=group)
    chunks = [M6Model(config, state, device="meta", chunk=c, virtual_stages=virtual_stages)
              for c in range(virtual_stages)]
    model = chunks[0] if virtual_stages == 1 else StageChunks(chunks)
    shapes, count, unique = {}, 0, 0
    for name, p in model.named_parameters():
        shapes[name] = tuple(p.shape)
        count += p.numel()
        tied_copy = param_role(p).tied_across_stages and pp > 1 and pp_rank == pp - 1
        sharded = param_role(p).tp_dim is not None
        if not tied_copy and (sharded or tp_rank == 0):
            unique += p.numel()
    return RankParameters(pp_rank, tp_rank, shapes, count, unique,
                          tuple(p.numel() for p in model.parameters()))


def meta_build(config: ModelConfig, tp: int, pp: int, dp: int, group,
               virtual_stages: int = 1) -> list[RankParameters]:
    """Every (pp_rank, tp_rank) of the layout built on the meta device (dp ranks are copies)."""
    return [meta_stage(config, tp, pp, dp, p, t, group, virtual_stages) for p in range(pp) for t in range(tp)]
