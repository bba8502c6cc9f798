"""load_checkpoint: check a checkpoint whole, then read every rank's shards in place, any layout;
load_model_weights: the model weights alone (finetuning's start)."""

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from m6_engine.checkpoint import rng
from m6_engine.checkpoint.collective import describe_failure, gather_lists, on_rank0
from m6_engine.checkpoint.folders import (
    MANIFEST, CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, check_checksums,
    check_sizes, latest_checkpoint, read_manifest, step_of,
)
from m6_engine.checkpoint.optimizer_state import hand_back, optimizer_entries
from m6_engine.checkpoint.save import (
    EXTRA_KEY, SCALAR_KEY, layout_of, model_entries,
)
from m6_engine.checkpoint.sharding import (
    MODEL_PREFIX, model_key, model_tensors, whole_parameters, zero_padding,
)
from m6_engine.parallel.random import RNGTracker
from m6_engine.parallel.state import ParallelState

_MAX_LISTED = 8


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a load restored besides the tensors it wrote in place."""

    path: Path
    """The checkpoint folder read."""
    step: int
    """The step it was saved at (resume with step + 1)."""
    extra: dict
    """The trainer's dict passed to save_checkpoint (data-sampler position, ...)."""
    config: dict | None
    """The config recorded at save time, as JSON data."""
    saved_layout: dict
    """{"tp", "pp", "dp", "world_size"} of the job that saved it."""
    rng: str
    """"restored" (same layout: bit-exact resume), "reseeded" (from (seed, step)) or "unchanged"."""


def resolve_checkpoint(path_or_dir) -> Path:
    """A checkpoint folder as given, or for a checkpoint directory the one to resume from."""
    path = Path(path_or_dir)
    if (path / MANIFEST).exists() or step_of(path) is not None:
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointNotFoundError(f"no complete checkpoint in {path}")
    return found


def _verify_files(folder: Path, manifest: dict, checksums: bool) -> None:
    """Every listed file present with its size (rank 0), and with checksums its crc32 (the ranks
    share the reading); raise on every rank, naming the files, when anything is wrong."""
    if checksums:
        world, rank = dist.get_world_size(), dist.get_rank()
        names = sorted(manifest["files"])
        problems = check_checksums(folder, manifest, names[rank::world])
    else:
        problems = check_sizes(folder, manifest) if dist.get_rank() == 0 else []
    problems = gather_lists(problems)
    if problems:
        raise CheckpointCorruptError(f"checkpoint {folder} is damaged:\n  " + "\n  ".join(problems))


def _expected_size(obj):
    return tuple(obj.global_shape) if hasattr(obj, "global_shape") else tuple(obj.shape)


def _check_keys(folder: Path, state_dict: dict) -> None:
    """Clear errors, on every rank, for keys the checkpoint lacks, global shapes that differ, and
    model tensors stored in the checkpoint that no rank of this model has."""
    stored = FileSystemReader(folder).read_metadata().state_dict_metadata
    problems = []
    for key, obj in state_dict.items():
        if key not in stored:
            problems.append(f"{key} is not in the checkpoint")
        elif isinstance(stored[key], TensorStorageMetadata) and \
                tuple(stored[key].size) != _expected_size(obj):
            problems.append(f"{key} has global shape {tuple(stored[key].size)} in the checkpoint, "
                            f"{_expected_size(obj)} in this model")
    wanted = set(gather_lists([k for k in state_dict if k.startswith(MODEL_PREFIX)]))
    unused = sorted(k for k in stored if k.startswith(MODEL_PREFIX) and k not in wanted)
    problems = sorted(set(gather_lists(problems)))
    if unused:
        problems.append(f"the checkpoint has {len(unused)} model tensor(s) this model lacks: "
                        + ", ".join(unused[:_MAX_LISTED]))
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"checkpoint {folder} does not match this model:\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + more)


def _read(folder: Path, state_dict: dict, tensors: dict) -> None:
    """DCP-read ``state_dict`` from ``folder`` in place, then zero the vocab padding rows of
    ``tensors`` (:func:`model_tensors`' entries, which the checkpoint never stores)."""
    try:
        dcp.load(state_dict, storage_reader=FileSystemReader(folder),
                 planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"reading checkpoint {folder} failed: {describe_failure(error)}") \
            from error
    for tensor, layout in tensors.values():
        zero_padding(tensor, layout)


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_model_weights` read and what it left as it was."""

    path: Path
    """The checkpoint folder read."""
    step: int
    """The step it was saved at."""
    config: dict | None
    """The config recorded at save time, as JSON data."""
    fresh: tuple[str, ...]
    """Global names of the parameters the checkpoint lacks and that kept their initial values
    (all ranks' together)."""


def load_model_weights(path_or_dir, *, model: nn.Module, state: ParallelState,
                       fresh_prefixes: tuple[str, ...] = (), verify: bool = True) -> LoadedWeights:
    """Load only the model weights of a checkpoint folder (or the latest in a checkpoint
    directory) into ``model``, resharded to this layout (collective): what finetuning starts
    from. Optimizer state, RNG streams and the trainer's ``extra`` are not read.

    Parameters the checkpoint lacks whose global name starts with one of ``fresh_prefixes`` (a
    finetuning head) keep their values; any other missing tensor, a global shape that differs, or
    a model tensor of the checkpoint this model lacks is a :class:`CheckpointError` naming it.
    """
    folder = Path(on_rank0(lambda: str(resolve_checkpoint(path_or_dir))))
    manifest = on_rank0(lambda: read_manifest(folder))
    _verify_files(folder, manifest, verify)
    stored = FileSystemReader(folder).read_metadata().state_dict_metadata
    with whole_parameters(model, write_back=True):
        tensors = model_tensors(model)
        fresh = sorted(n for n in tensors if fresh_prefixes and n.startswith(tuple(fresh_prefixes))
                       and model_key(n) not in stored)
        tensors = {n: v for n, v in tensors.items() if n not in fresh}
        state_dict = model_entries(tensors, state.mesh["tp"])
        _check_keys(folder, state_dict)
        _read(folder, state_dict, tensors)
    return LoadedWeights(path=folder, step=manifest["step"], config=manifest.get("config"),
                         fresh=tuple(sorted(set(gather_lists(fresh)))))


def load_checkpoint(path_or_dir, *, model: nn.Module, state: ParallelState, optimizer=None,
                    rng_tracker: RNGTracker | None = None, seed: int | None = None,
                    verify: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint folder, or the one to resume from in a checkpoint directory
    (:func:`latest_checkpoint`), into ``model`` and ``optimizer`` in place (collective).

    Any (tp, pp, dp) loads a checkpoint saved with any other. ``verify`` checks every file's crc32
    (the ranks share the reading) besides its size. RNG: restored when the layout is unchanged,
    else reseeded from (``seed``, step) when ``seed`` is given (``m6_engine.checkpoint.rng``).
    """
    folder = Path(on_rank0(lambda: str(resolve_checkpoint(path_or_dir))))
    manifest = on_rank0(lambda: read_manifest(folder))
    _verify_files(folder, manifest, verify)
    if optimizer is not None and not manifest.get("optimizer"):
        raise CheckpointError(f"checkpoint {folder} holds no optimizer state; pass optimizer=None "
                              "to load the model only")

    same_layout = (manifest["layout"] == layout_of(state)
                   and manifest.get("device_type") == state.device.type)
    # ZeRO-3: the layers gathered while read into, resharded after (before the optimizer's
    # masters are handed back, which then write the shards last).
    with whole_parameters(model, write_back=True):
        tensors, tp_mesh = model_tensors(model), state.mesh["tp"]
        state_dict = model_entries(tensors, tp_mesh)
        optimizer_read = None
        if optimizer is not None:
            optimizer_read = optimizer_entries(optimizer, tensors, state, for_save=False)
            state_dict.update(optimizer_read.entries)
            state_dict[SCALAR_KEY] = None
        state_dict[EXTRA_KEY] = None
        if same_layout:
            state_dict[rng.rng_key(state.rank)] = None
        _check_keys(folder, state_dict)
        _read(folder, state_dict, tensors)
    if optimizer is not None:
        hand_back(optimizer, tensors, optimizer_read)
        optimizer.load_scalar_state(state_dict[SCALAR_KEY])

    step = manifest["step"]
    if same_layout and rng.restore(state_dict[rng.rng_key(state.rank)], state, rng_tracker):
        rng_status = rng.RESTORED
    elif seed is not None:
        rng.reseed(seed, step, state, rng_tracker)
        rng_status = rng.RESEEDED
    else:
        rng_status = rng.UNCHANGED
    return LoadedCheckpoint(path=folder, step=step, extra=state_dict[EXTRA_KEY],
                            config=manifest.get("config"), saved_layout=manifest["layout"],
                            rng=rng_status)
