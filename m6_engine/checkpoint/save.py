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

A save is two parts. :func:`save_entries` builds the state dict: views of the live tensors (this
synchronous save), or copies in host memory (``async_save``, which then lets training go on).
:func:`write_checkpoint` writes it, the same code for both, collective on the group it is given:

1. every rank creates the ``.tmp-step_*`` folder and rank 0 writes the attachments (a failure on
   any rank fails every rank, before anything else is written);
2. ``dcp.save`` through a :class:`digests.DigestingWriter`: each rank writes its shards, taking
   every file's size and crc32 from the bytes as they go out; DCP's closing collective returns
   once every rank's shards are written and rank 0 has written ``.metadata``;
3. the ranks' digests are gathered; rank 0 checks that they name every file in the folder at its
   size, writes the manifest and publishes the folder (``folders``), then prunes (``keep_last``).

Nothing is read back. Until step 3 publishes, the checkpoints already in the directory are the
ones a resume finds, whatever happens to the job.
"""

import copy
import dataclasses
import json
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from m6_engine.checkpoint import rng
from m6_engine.checkpoint.collective import describe_failure, from_rank0, on_every_rank, on_rank0
from m6_engine.checkpoint.digests import DigestingWriter
from m6_engine.checkpoint.folders import (
    FORMAT, FORMAT_VERSION, MANIFEST, CheckpointError, prune, publish, step_dirname, tmp_dirname,
    write_manifest,
)
from m6_engine.checkpoint.optimizer_state import optimizer_entries
from m6_engine.checkpoint.sharding import (
    chunk_view, global_view, model_key, model_tensors, whole_parameters,
)
from m6_engine.checkpoint.staging import HostStaging
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


@dataclass(frozen=True)
class SaveRequest:
    """One checkpoint to write: where, and what its manifest records besides the files."""

    ckpt_dir: Path
    step: int
    tmp: Path
    """The folder the save writes into, renamed to :attr:`final` once complete."""
    manifest: dict
    """The manifest's fields but "files" and "saved_unix" (JSON data)."""
    keep_last: int | None
    attachments: dict
    """{file name: content}: rank 0's, written beside the shards (empty on the other ranks)."""

    @property
    def final(self) -> Path:
        return self.ckpt_dir / step_dirname(self.step)


def save_request(ckpt_dir, step: int, *, state: ParallelState, optimizer=None, extra: dict | None = None,
                 config=None, keep_last: int | None = None, inputs: dict | None = None,
                 attachments: dict[str, bytes] | None = None) -> SaveRequest:
    """The checked arguments of a save, and its temporary folder's name (collective: rank 0
    draws it)."""
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
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "layout": layout_of(state),
                "device_type": state.device.type, "optimizer": optimizer is not None,
                "config": _jsonable(config), "inputs": _jsonable(inputs), "torch": torch.__version__}
    return SaveRequest(ckpt_dir=ckpt_dir, step=step,
                       tmp=ckpt_dir / tmp_dirname(step, from_rank0(uuid.uuid4().hex[:12])),
                       manifest=manifest, keep_last=keep_last,
                       attachments=dict(attachments or {}) if state.rank == 0 else {})


def save_entries(model: nn.Module, state: ParallelState, *, optimizer=None, extra: dict | None = None,
                 rng_tracker: RNGTracker | None = None, staging: HostStaging | None = None) -> dict:
    """The DCP state dict of a save (call inside ``whole_parameters(model)``): views of the live
    tensors, or with ``staging`` copies of them (and of ``extra``) in its host buffers, which
    nothing the training loop does next can change."""
    tensors = model_tensors(model)
    if staging is None:
        state_dict = model_entries(tensors, state.mesh["tp"])
    else:
        state_dict = {model_key(n): chunk_view(staging.copy(model_key(n), t), layout,
                                               state.tp_rank, state.tp_size)
                      for n, (t, layout) in tensors.items()}
    if optimizer is not None:
        state_dict.update(optimizer_entries(optimizer, tensors, state, for_save=True,
                                            staging=staging).entries)
    if state.rank == 0:
        state_dict[EXTRA_KEY] = dict(extra or {}) if staging is None else copy.deepcopy(dict(extra or {}))
        if optimizer is not None:
            state_dict[SCALAR_KEY] = optimizer.scalar_state()
    state_dict[rng.rng_key(state.rank)] = rng.capture(state, rng_tracker)
    return state_dict


def _prepare_folder(request: SaveRequest) -> dict:
    """Create the temporary folder and write the attachments; their (size, crc32) by name."""
    request.tmp.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, content in request.attachments.items():
        (request.tmp / name).write_bytes(content)
        digests[name] = (len(content), zlib.crc32(content))
    return digests


def _files_of(folder: Path, digests: list[dict]) -> dict:
    """The manifest's "files" from every rank's digests; CheckpointError unless they name every
    file of ``folder`` (but the manifest) at its size on disk (a stat, not a read)."""
    files = {name: {"bytes": size, "crc32": crc} for part in digests for name, (size, crc) in part.items()}
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    problems = [f"{name} was written without a digest" for name in sorted(set(on_disk) - set(files))]
    problems += [f"{name} was digested but is not in the folder" for name in sorted(set(files) - set(on_disk))]
    problems += [f"{name} has {on_disk[name]} bytes on disk, {files[name]['bytes']} were digested"
                 for name in sorted(set(files) & set(on_disk)) if on_disk[name] != files[name]["bytes"]]
    if problems:
        raise CheckpointError(f"the files of {folder} do not match what was written: " + "; ".join(problems))
    return files


def _publish(request: SaveRequest, digests: list[dict]) -> None:
    files = _files_of(request.tmp, digests)
    write_manifest(request.tmp, {**request.manifest, "saved_unix": time.time(), "files": files})
    publish(request.tmp, request.final)


def write_checkpoint(request: SaveRequest, state_dict: dict, *, group=None,
                     from_host: bool = False) -> Path:
    """Write ``state_dict`` (:func:`save_entries`) as the checkpoint of ``request`` and publish it
    (the module docstring's steps); collective over ``group`` (None: the default group), which
    must hold every rank. ``from_host``: the tensors are host copies already (DCP then copies
    nothing ahead). A failure on any rank raises CheckpointError on every rank, naming the step
    and the folder, and leaves the earlier checkpoints untouched."""
    try:
        attached = on_every_rank(lambda: _prepare_folder(request), group)
        writer = DigestingWriter(request.tmp, **({"per_thread_copy_ahead": 0} if from_host else {}))
        dcp.save(state_dict, storage_writer=writer, process_group=group,
                 planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
        digests = on_every_rank(writer.digests, group)
        on_rank0(lambda: _publish(request, [*attached, *digests]), group)
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"saving step {request.step} into {request.tmp} failed; the checkpoints "
                              f"already in {request.ckpt_dir} are untouched. {describe_failure(error)}") \
            from error
    try:
        on_rank0(lambda: prune(request.ckpt_dir, request.keep_last, request.final), group)
    except Exception as error:  # noqa: BLE001 - the new checkpoint is safe; say what was not deleted
        raise CheckpointError(f"step {request.step} was saved to {request.final}, but deleting older "
                              f"checkpoints (keep_last = {request.keep_last}) failed: "
                              f"{describe_failure(error)}") from error
    return request.final


def save_checkpoint(ckpt_dir, step: int, *, model: nn.Module, state: ParallelState,
                    optimizer=None, extra: dict | None = None, rng_tracker: RNGTracker | None = None,
                    config=None, keep_last: int | None = None, inputs: dict | None = None,
                    attachments: dict[str, bytes] | None = None) -> Path:
    """Save ``ckpt_dir/step_<step>`` (collective: every rank calls it) and return its path, once
    it is published: the synchronous save, and the reference the asynchronous one
    (``async_save.AsyncCheckpointer``) is compared with.

    ``model``: this rank's stage (a DataParallel wrapper is unwrapped), parameters named by
    global names; ``optimizer``: a ``CheckpointableOptimizer`` (see the package doc); ``extra``:
    the trainer's resume state; ``config``: recorded in the manifest;
    ``keep_last``: delete all but the newest K complete checkpoints once this one is published;
    ``inputs``: recorded in the manifest (what the model reads: ``m6_engine.data.model_inputs``);
    ``attachments``: small files ({name: content}, given on rank 0) stored beside the shards and
    covered by the manifest's digests like them (the vocabulary).
    A failure on any rank raises on every rank and leaves earlier checkpoints untouched.
    """
    request = save_request(ckpt_dir, step, state=state, optimizer=optimizer, extra=extra, config=config,
                           keep_last=keep_last, inputs=inputs, attachments=attachments)
    with whole_parameters(model):       # ZeRO-3: the layers gathered while they are written
        state_dict = save_entries(model, state, optimizer=optimizer, extra=extra, rng_tracker=rng_tracker)
        return write_checkpoint(request, state_dict)
