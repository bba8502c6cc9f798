"""save_checkpoint: every rank writes its shards into a temporary folder, rank 0 publishes it.

What one checkpoint holds (keys of the DCP state dict):

    model.<name>                    every parameter / persistent buffer, as its global tensor
    optimizer.<name>.<key>          the optimizer's per-parameter fp32 tensors, sharded like <name>
                                    (each rank writes the pieces it updates: optimizer_state)
    optimizer_scalar                optimizer.scalar_state(): loss scaler, LR schedule, step counts
    extra                           the trainer's dict (data-sampler position, ...), from rank 0
    rng.rank<r>                     rank r's RNG streams (see ``m6_engine.checkpoint.rng``)

plus, in the ``complete`` manifest (JSON): step, layout (tp, pp, dp), device type, the config the
trainer passes, and the size and crc32 of every file. The ``extra`` dict and the optimizer's scalar
state must be the same on every rank (rank 0's copy is stored); they are pickled.
"""

import dataclasses
import json
import re
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from m6_engine.checkpoint import rng
from m6_engine.checkpoint.collective import describe_failure, from_rank0, on_rank0
from m6_engine.checkpoint.folders import (
    FORMAT, FORMAT_VERSION, MANIFEST, CheckpointError, file_digest, prune, publish, step_dirname,
    tmp_dirname, write_manifest,
)
from m6_engine.checkpoint.optimizer_state import optimizer_entries
from m6_engine.checkpoint.sharding import global_view, model_key, model_tensors, whole_parameters
from m6_engine.parallel.random import RNGTracker
from m6_engine.parallel.state import ParallelState

SCALAR_KEY = "optimizer_scalar"
ATTACHMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
EXTRA_KEY = "extra"


def layout_of(state: ParallelState) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size,
            "world_size": state.world_size}


def _jsonable(config):
    """``config`` (a dataclass, a dict of them, or None) as plain JSON data."""
    if config is None:
        return None
    default = lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)  # noqa: E731
    return json.loads(json.dumps(config, default=default))


def model_entries(tensors: dict, tp_mesh) -> dict:
    """DCP entries of :func:`model_tensors`' tensors."""
    return {model_key(n): global_view(t, layout, tp_mesh) for n, (t, layout) in tensors.items()}


def _file_digests(folder: Path) -> dict:
    """{file: {"bytes", "crc32"}} of every file in ``folder``; the ranks share the reading."""
    names = from_rank0(sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST))
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = {n: file_digest(folder / n) for i, n in enumerate(names) if i % world == rank}
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return {}
    return {n: {"bytes": size, "crc32": crc} for part in parts for n, (size, crc) in part.items()}


def save_checkpoint(ckpt_dir, step: int, *, model: nn.Module, state: ParallelState,
                    optimizer=None, extra: dict | None = None, rng_tracker: RNGTracker | None = None,
                    config=None, keep_last: int | None = None, inputs: dict | None = None,
                    attachments: dict[str, bytes] | None = None) -> Path:
    """Save ``ckpt_dir/step_<step>`` (collective: every rank calls it) and return its path.

    ``model``: this rank's stage (a DataParallel wrapper is unwrapped), parameters named by
    global names; ``optimizer``: a ``CheckpointableOptimizer`` (see the package doc); ``extra``:
    the trainer's resume state; ``config``: recorded in the manifest;
    ``keep_last``: delete all but the newest K complete checkpoints once this one is published;
    ``inputs``: recorded in the manifest (what the model reads: ``m6_engine.data.model_inputs``);
    ``attachments``: small files ({name: content}, given on rank 0) stored beside the shards and
    covered by the manifest's digests like them (the vocabulary).
    A failure on any rank raises on every rank and leaves earlier checkpoints untouched.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an integer >= 1, got {keep_last!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    for name in attachments or {}:
        if not ATTACHMENT_NAME.fullmatch(name) or name == MANIFEST or name.endswith(".distcp"):
            raise ValueError(f"attachment name {name!r}: give a plain file name (letters, digits, ._-), "
                             f"not {MANIFEST} or a shard's")
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / tmp_dirname(step, from_rank0(uuid.uuid4().hex[:12]))
    tmp.mkdir(parents=True, exist_ok=True)
    if state.rank == 0:
        for name, content in (attachments or {}).items():
            (tmp / name).write_bytes(content)   # digested below with the shards

    with whole_parameters(model):       # ZeRO-3: the layers gathered while they are written
        tensors, tp_mesh = model_tensors(model), state.mesh["tp"]
        state_dict = model_entries(tensors, tp_mesh)
        if optimizer is not None:
            state_dict.update(optimizer_entries(optimizer, tensors, state, for_save=True).entries)
        if state.rank == 0:
            state_dict[EXTRA_KEY] = dict(extra or {})
            if optimizer is not None:
                state_dict[SCALAR_KEY] = optimizer.scalar_state()
        state_dict[rng.rng_key(state.rank)] = rng.capture(state, rng_tracker)
        try:
            dcp.save(state_dict, storage_writer=FileSystemWriter(tmp),
                     planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
        except (Exception, CheckpointException) as error:
            raise CheckpointError(f"saving step {step} into {tmp} failed; the checkpoints already in "
                                  f"{ckpt_dir} are untouched. {describe_failure(error)}") from error

    files = _file_digests(tmp)
    final = ckpt_dir / step_dirname(step)

    def finish():
        write_manifest(tmp, {
            "format": FORMAT, "version": FORMAT_VERSION, "step": step, "layout": layout_of(state),
            "device_type": state.device.type, "optimizer": optimizer is not None,
            "config": _jsonable(config), "inputs": _jsonable(inputs), "torch": torch.__version__,
            "saved_unix": time.time(),
            "files": files})
        publish(tmp, final)
        prune(ckpt_dir, keep_last, final)

    on_rank0(finish)
    return final
