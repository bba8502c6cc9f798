"""The few object collectives a checkpoint needs: on the default (world) process group, or on the
group given (a background save's own gloo group, so its collectives never interleave with the
training loop's)."""

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from m6_engine.checkpoint.folders import CheckpointError


def from_rank0(value, group=None):
    """Rank 0's ``value`` on every rank (so all ranks act on one decision, e.g. one folder name)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def on_rank0(fn, group=None):
    """Run ``fn()`` on rank 0 only; every rank returns its result, or raises when it failed
    (rank 0 its own exception, the others a CheckpointError quoting it)."""
    outcome, error = None, None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - reported to every rank, re-raised below
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
    status, value = from_rank0(outcome, group)
    if error is not None:
        raise error
    if status == "error":
        raise CheckpointError(f"rank 0 failed: {value}")
    return value


def on_every_rank(fn, group=None) -> list:
    """Run ``fn()`` on every rank; return every rank's result in rank order, on every rank, or
    raise a CheckpointError naming each rank that failed, on every rank (so no rank goes on to a
    collective the others never reach)."""
    try:
        outcome = ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - reported to every rank, raised below
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    outcomes = gather_lists([outcome], group)
    failed = [f"rank {rank}: {value}" for rank, (status, value) in enumerate(outcomes) if status == "error"]
    if failed:
        raise CheckpointError("; ".join(failed))
    return [value for _, value in outcomes]


def gather_lists(items: list, group=None) -> list:
    """The concatenation, in rank order, of every rank's ``items``, on every rank."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, items, group=group)
    return [x for part in parts for x in part]


def describe_failure(error: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (a BaseException whose text is
    every rank's traceback), else the exception itself."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"
                         for rank, exc in sorted(error.failures.items()))
    return f"{type(error).__name__}: {error}"
