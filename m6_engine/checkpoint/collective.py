"""The few object collectives a checkpoint needs, on the default (world) process group."""

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from m6_engine.checkpoint.folders import CheckpointError


def from_rank0(value):
    """Rank 0's ``value`` on every rank (so all ranks act on one decision, e.g. one folder name)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn):
    """Run ``fn()`` on rank 0 only; every rank returns its result, or raises when it failed
    (rank 0 its own exception, the others a CheckpointError quoting it)."""
    outcome, error = None, None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - reported to every rank, re-raised below
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
    status, value = from_rank0(outcome)
    if error is not None:
        raise error
    if status == "error":
        raise CheckpointError(f"rank 0 failed: {value}")
    return value


def gather_lists(items: list) -> list:
    """The concatenation, in rank order, of every rank's ``items``, on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def describe_failure(error: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (a BaseException whose text is
    every rank's traceback), else the exception itself."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"
                         for rank, exc in sorted(error.failures.items()))
    return f"{type(error).__name__}: {error}"
