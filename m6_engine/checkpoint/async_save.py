"""Asynchronous checkpoints: the training loop hands a snapshot off and goes on; a thread writes it.

    checkpointer = AsyncCheckpointer(state.device, timeout_s=...)   # collective: a gloo group
    checkpointer.save(ckpt_dir, step, model=..., state=..., ...)    # as save_checkpoint; returns
                                                                    # once the state is staged
    checkpointer.wait()     # the save in flight published (or its CheckpointError raised)

:meth:`AsyncCheckpointer.save` first waits for the save in flight (at most one is), copies what
the checkpoint stores into host memory (``staging``: the optimizer's next in-place update cannot
reach the snapshot), and starts a thread that runs ``save.write_checkpoint``, the synchronous
save's own writing and publishing steps, on the snapshot. So the files, the manifest and the
protocol on disk are those of ``save_checkpoint``, and a job killed at any moment leaves the
previous complete checkpoint as the one a resume finds: the new one is published (renamed from its
``.tmp-*`` folder) only after every rank's shards are written.

The thread's collectives (DCP's planning and its closing all-reduce, the digests' gather, rank
0's outcome) run on a gloo group of every rank made for the checkpointer, never on the training
loop's groups: collectives on one group must be issued in the same order on every rank, which two
threads sharing a group cannot promise, and DCP's object collectives need a CPU backend anyway
(``dcp.async_save`` refuses a group without one; a GPU job's groups are NCCL). A write that fails fails on
every rank's thread (the steps are collective), and the error is raised, as a CheckpointError
naming the step and the folder, by the next :meth:`save` or :meth:`wait` on every rank; the earlier
checkpoints are untouched.

Why not ``torch.distributed.checkpoint.async_save`` (2.11 and 2.14 alike: stage with the writer's
``BlockingAsyncStager``, then ``dcp.save`` in a one-thread executor; the group must have a CPU
backend): its stager copies tensors with ``_copy_state_dict``, which drops the chunk description
of the tensors ``chunks`` builds on 2.14 (it would store a vocab-parallel weight or a ZeRO-1
piece as a plain local tensor) and raises on 2.11's ``ChunkedTensor``; and its future covers
``dcp.save`` only, while publication must follow in the same thread, collectively.
"""

import datetime
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from m6_engine.checkpoint.folders import CheckpointError
from m6_engine.checkpoint.save import SaveRequest, save_entries, save_request, write_checkpoint
from m6_engine.checkpoint.sharding import whole_parameters
from m6_engine.checkpoint.staging import HostStaging
from m6_engine.parallel.random import RNGTracker
from m6_engine.parallel.state import ParallelState


@dataclass(frozen=True)
class SaveInFlight:
    """A save whose writing thread was started."""

    request: SaveRequest
    outcome: Future
    """Resolves to the seconds the thread took to write and publish, or to its exception."""

    @property
    def path(self) -> Path:
        return self.request.final


@dataclass(frozen=True)
class CommittedSave:
    """A background save that was published."""

    path: Path
    step: int
    write_seconds: float
    """What the thread took to write and publish it."""


def _write_in_background(request: SaveRequest, state_dict: dict, group, outcome: Future) -> None:
    start = time.perf_counter()
    try:
        write_checkpoint(request, state_dict, group=group, from_host=True)
    except BaseException as error:  # noqa: BLE001 - handed to the training thread, raised there
        outcome.set_exception(error)
    else:
        outcome.set_result(time.perf_counter() - start)


class AsyncCheckpointer:
    """Checkpoints written in the background, one at a time (module docstring).

    Construct it on every rank at the same point (it creates a gloo process group over all ranks,
    with ``timeout_s``, the longest a rank waits for the others' writes); ``device``: where the
    training state lives (a GPU's is staged into pinned memory).
    """

    def __init__(self, device: torch.device, *, timeout_s: float | None = None):
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        self.group = dist.new_group(backend="gloo", **kwargs)
        self.staging = HostStaging(device)
        self.in_flight: SaveInFlight | None = None

    def save(self, ckpt_dir, step: int, *, model: nn.Module, state: ParallelState, optimizer=None,
             extra: dict | None = None, rng_tracker: RNGTracker | None = None, config=None,
             keep_last: int | None = None, inputs: dict | None = None,
             attachments: dict[str, bytes] | None = None) -> Path:
        """Start saving ``ckpt_dir/step_<step>`` (collective; the arguments of ``save_checkpoint``)
        and return the path it will be published at. Waits for the save in flight first, and
        raises its CheckpointError if it failed (this one is then not started)."""
        self.wait()
        request = save_request(ckpt_dir, step, state=state, optimizer=optimizer, extra=extra,
                               config=config, keep_last=keep_last, inputs=inputs,
                               attachments=attachments)
        self.staging.begin()
        with whole_parameters(model):   # ZeRO-3: gathered while they are copied
            state_dict = save_entries(model, state, optimizer=optimizer, extra=extra,
                                      rng_tracker=rng_tracker, staging=self.staging)
        self.staging.finish()
        outcome = Future()
        thread = threading.Thread(target=_write_in_background, args=(request, state_dict, self.group, outcome),
                                  name=f"m6-checkpoint-step{step}",
                                  daemon=True)   # a job that dies must not wait for its write
        thread.start()
        self.in_flight = SaveInFlight(request, outcome)
        return request.final

    def wait(self) -> CommittedSave | None:
        """Wait for the save in flight: what was published (None when nothing was in flight), or
        CheckpointError, on every rank, naming its step and folder when it failed."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return None
        try:
            write_seconds = flight.outcome.result()
        except BaseException as error:
            raise CheckpointError(f"asynchronous checkpoint (train.async_save) of step "
                                  f"{flight.request.step}, to be published as {flight.path}: "
                                  f"{error}") from error
        return CommittedSave(flight.path, flight.request.step, write_seconds)

    def close(self) -> CommittedSave | None:
        """:meth:`wait`, then free the staging buffers (a later save allocates them again)."""
        try:
            return self.wait()
        finally:
            self.staging.release()


__all__ = ["AsyncCheckpointer", "CommittedSave", "SaveInFlight"]
