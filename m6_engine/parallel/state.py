"""Process groups of one training job: the rank layout and the ``ParallelState`` value.

Vocabulary: an *axis* is a mesh dimension ("pp", "dp", "tp"); a *group* is a set of ranks that
communicate. Ranks form a ``DeviceMesh`` of shape (pp, dp, tp) with tp fastest, so tensor-parallel
peers are neighbouring ranks (one node):

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Groups, each looked up by name with :meth:`ParallelState.group`:

    "tp"         the tp ranks of one (pp, dp) position     (tensor-parallel all-reduces)
    "pp"         the pp ranks of one (dp, tp) position     (pipeline p2p)
    "dp"         the dp ranks of one (pp, tp) position     (gradient all-reduce)
    "mp"         the tp*pp ranks of one dp position        (model-parallel: one model replica)
    "embedding"  first and last stage of one (dp, tp) position (tied word-embedding gradient);
                 a single rank when pp == 1

:func:`rank_layout` computes all of this as a pure function (no processes); :func:`initialize`
validates the layout, then creates the groups. A plain single process (no torchrun variables)
gets a one-rank process group over an in-process ``HashStore``: no network and no environment
variables, and every code path (collectives on one-rank groups included) is the one a multi-rank
job takes.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

AXES = ("pp", "dp", "tp")
GROUP_NAMES = ("tp", "pp", "dp", "mp", "embedding")


class LayoutError(ValueError):
    """A parallel layout that cannot be built; raised before any collective is entered."""


@dataclass(frozen=True)
class RankLayout:
    """Sizes of the (pp, dp, tp) mesh and the rank groups derived from it; pure data."""

    world_size: int
    tp: int
    pp: int
    dp: int

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank at mesh coordinates (pp_rank, dp_rank, tp_rank)."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Mesh coordinates (pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside the world of {self.world_size} ranks")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        return rank // (self.tp * self.dp), dp_rank, tp_rank

    def mesh(self) -> list[list[list[int]]]:
        """Global ranks as a nested (pp, dp, tp) list: the DeviceMesh layout."""
        return [[[self.rank_of(p, d, t) for t in range(self.tp)] for d in range(self.dp)]
                for p in range(self.pp)]

    def groups(self, name: str) -> tuple[tuple[int, ...], ...]:
        """Every group of one kind, in a fixed order (group creation is collective: all ranks
        must create all groups in the same order)."""
        r, pp, dp, tp = self.rank_of, self.pp, self.dp, self.tp
        if name == "tp":
            return tuple(tuple(r(p, d, t) for t in range(tp)) for p in range(pp) for d in range(dp))
        if name == "dp":
            return tuple(tuple(r(p, d, t) for d in range(dp)) for p in range(pp) for t in range(tp))
        if name == "pp":
            return tuple(tuple(r(p, d, t) for p in range(pp)) for d in range(dp) for t in range(tp))
        if name == "mp":
            return tuple(tuple(r(p, d, t) for p in range(pp) for t in range(tp)) for d in range(dp))
        if name == "embedding":
            return tuple(tuple(sorted({r(0, d, t), r(pp - 1, d, t)}))
                         for d in range(dp) for t in range(tp))
        raise KeyError(f"unknown group {name!r}; groups are {GROUP_NAMES}")

    def group_of(self, name: str, rank: int) -> tuple[int, ...]:
        """The group of kind ``name`` that contains ``rank``; () for a middle pipeline stage's
        "embedding" group (it holds no tied weights)."""
        self.coords(rank)  # range check
        return next((g for g in self.groups(name) if rank in g), ())


def rank_layout(world_size: int, tp: int = 1, pp: int = 1) -> RankLayout:
    """Validate the sizes and return the layout; dp = world_size / (tp * pp)."""
    for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayoutError(f"{name} must be an integer >= 1, got {value!r}")
    if tp * pp > world_size:
        raise LayoutError(f"the mesh tp * pp = {tp} * {pp} = {tp * pp} does not fit in "
                          f"{world_size} rank(s)")
    if world_size % (tp * pp):
        raise LayoutError(f"world size {world_size} is not divisible by tp * pp = {tp} * {pp} "
                          f"= {tp * pp}, so dp = world / (tp * pp) is not an integer")
    return RankLayout(world_size=world_size, tp=tp, pp=pp, dp=world_size // (tp * pp))


@dataclass(frozen=True, eq=False)
class ParallelState:
    """This rank's place in the layout and its process groups; built by :func:`initialize`.

    Passed explicitly to everything that communicates (no global getter). ``device`` is where
    this rank computes and where communication buffers live (cuda:LOCAL_RANK with NCCL, else cpu).
    """

    layout: RankLayout
    rank: int
    device: torch.device
    mesh: DeviceMesh
    groups: Mapping[str, dist.ProcessGroup]

    def group(self, name: str) -> dist.ProcessGroup | None:
        """This rank's process group of kind ``name`` (one of GROUP_NAMES); None only for the
        "embedding" group of a middle pipeline stage."""
        if name not in self.groups:
            raise KeyError(f"unknown group {name!r}; groups are {GROUP_NAMES}")
        return self.groups[name]

    def group_ranks(self, name: str) -> tuple[int, ...]:
        """Global ranks of this rank's group of kind ``name``."""
        return self.layout.group_of(name, self.rank)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage, i.e. its ``stage_id``."""
        return self.layout.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (same dp, tp position); None on stage 0."""
        if self.is_first_stage:
            return None
        return self.layout.rank_of(self.pp_rank - 1, self.dp_rank, self.tp_rank)

    @property
    def next_stage_rank(self) -> int | None:
        """Global rank of the next pipeline stage; None on the last stage."""
        if self.is_last_stage:
            return None
        return self.layout.rank_of(self.pp_rank + 1, self.dp_rank, self.tp_rank)


@dataclass(frozen=True)
class _LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    torchrun: bool


def _launch_env() -> _LaunchEnv:
    """Rank and world size from an existing default group, torchrun's variables, or a lone process."""
    if dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return _LaunchEnv(dist.get_rank(), dist.get_world_size(), local, torchrun=True)
    have = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if len(have) == 1:
        raise LayoutError(f"only {have[0]} is set; a torchrun launch sets both RANK and WORLD_SIZE")
    if not have:
        return _LaunchEnv(0, 1, 0, torchrun=False)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise LayoutError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {error}") from None
    if not 0 <= rank < world:
        raise LayoutError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return _LaunchEnv(rank, world, local, torchrun=True)


def _as_timedelta(timeout) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout <= 0:
        raise LayoutError(f"timeout must be > 0 seconds, got {timeout}")
    return datetime.timedelta(seconds=float(timeout))


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LayoutError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False")
    if local_rank >= torch.cuda.device_count():
        raise LayoutError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) "
                          "are visible: launch at most one process per GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _mesh_backend_override(backend: str, timeout: datetime.timedelta | None):
    """DeviceMesh passes a group timeout only through backend options (torch 2.14)."""
    if timeout is None:
        return None
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
    else:
        options = torch._C._distributed_c10d.Backend.Options(backend, timeout)
    return ((backend, options),) * len(AXES)


def _own_group(layout: RankLayout, name: str, rank: int, backend: str, timeout):
    """Create every group of one kind (collective, same order on all ranks); return ours."""
    own = None
    for ranks in layout.groups(name):
        group = dist.new_group(list(ranks), backend=backend, timeout=timeout)
        if rank in ranks:
            own = group
    return own


def initialize(tp: int = 1, pp: int = 1, *, backend: str | None = None,
               timeout: float | datetime.timedelta | None = None) -> ParallelState:
    """Build the (pp, dp, tp) mesh and this rank's groups; dp = world / (tp * pp).

    Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR / MASTER_PORT for the default
    group) unless the default group already exists. ``backend`` defaults to nccl when CUDA is
    available, else gloo. ``timeout`` (seconds or timedelta) applies to every group created here,
    so a rank that never arrives fails the job instead of hanging it. The layout is validated
    before any collective; calling this again builds a new set of groups (all ranks must call it).
    """
    env = _launch_env()
    layout = rank_layout(env.world_size, tp, pp)
    timeout = _as_timedelta(timeout)
    if backend is None:
        backend = dist.get_backend() if dist.is_initialized() else (
            "nccl" if torch.cuda.is_available() else "gloo")
    device = _device_for(backend, env.local_rank)
    if not dist.is_initialized():
        kwargs = {} if timeout is None else {"timeout": timeout}
        if env.torchrun:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    mesh = DeviceMesh(device.type, torch.tensor(layout.mesh()), mesh_dim_names=AXES,
                      backend_override=_mesh_backend_override(backend, timeout))
    groups = {axis: mesh.get_group(axis) for axis in AXES}
    for name in ("mp", "embedding"):
        groups[name] = _own_group(layout, name, env.rank, backend, timeout)
    # NCCL builds a communicator at its first use, and a first batch_isend_irecv must involve every
    # rank of the group: a barrier here builds the pipeline group's, whatever the schedule does first.
    dist.barrier(group=groups["pp"])
    return ParallelState(layout=layout, rank=env.rank, device=device, mesh=mesh, groups=groups)
