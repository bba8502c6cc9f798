"""Sharded, reshardable, atomic checkpoints on ``torch.distributed.checkpoint`` (DCP).

    save_checkpoint(ckpt_dir, step, model=..., state=..., optimizer=..., extra=..., rng_tracker=...,
                    config=..., keep_last=K) -> ckpt_dir/step_000123
    load_checkpoint(ckpt_dir_or_folder, model=..., state=..., optimizer=..., rng_tracker=...,
                    seed=...) -> LoadedCheckpoint(step, extra, config, saved_layout, rng, path)
    latest_checkpoint(ckpt_dir) -> Path | None          # what ``--load auto`` resumes from
    AsyncCheckpointer(device, timeout_s=...)            # collective: a gloo group for its thread
        .save(ckpt_dir, step, <save_checkpoint's arguments>) -> ckpt_dir/step_000123 (to be)
        .wait() -> CommittedSave | None                 # the save in flight published, or raises
    load_model_weights(ckpt_dir_or_folder, model=..., state=..., fresh_prefixes=(...))
        -> LoadedWeights(path, step, config, fresh)     # weights only: what finetuning starts from

All calls are collective over the job. Every rank writes its own shards in parallel; tensors are
keyed by global names and stored as global tensors (``sharding``: DTensor shards over the "tp"
mesh axis, the vocab-parallel embedding without its tp-dependent padding), so a checkpoint saved
with one (tp, pp, dp) loads into any other. Folders are published atomically with a manifest
written last (``folders``), each file's size and crc32 taken as it is written (``digests``); RNG
streams are restored when the layout is unchanged and reseeded otherwise (``rng``). An
asynchronous save copies the state into host memory (``staging``) and writes it from a thread
(``async_save``): the same files and protocol as ``save_checkpoint``, the synchronous reference.

The optimizer contract (``optimizer_state.CheckpointableOptimizer``, implemented by
``m6_engine.optim.MixedPrecisionOptimizer``): with ``named = {global name: parameter}`` of the stage,

    optimizer.state_pieces(named) -> {name: [(first, end, {"master" | "exp_avg" | "exp_avg_sq":
                                      fp32 tensor of end - first elements}), ...]}
                                      the flat ranges this rank updates, live tensors, no copies
    optimizer.load_state_pieces(named, pieces)                             (collective over dp)
    optimizer.scalar_state() -> dict;  optimizer.load_scalar_state(dict)

Per-parameter states are stored sharded like their parameter. Every layout takes the one path:
each rank writes and reads only the pieces it updates (with ZeRO-1 its dp share, without it whole
parameters, de-duplicated across dp by DCP); on load the optimizer's own pieces are the buffers DCP
fills, then handed back (``optimizer_state``). Nothing is gathered.
"""

from m6_engine.checkpoint.async_save import AsyncCheckpointer, CommittedSave
from m6_engine.checkpoint.folders import (
    CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, complete_checkpoints,
    latest_checkpoint, read_manifest, step_dirname,
)
from m6_engine.checkpoint.load import (
    LoadedCheckpoint, LoadedWeights, load_checkpoint, load_model_weights, resolve_checkpoint,
)
from m6_engine.checkpoint.rng import resume_seed
from m6_engine.checkpoint.save import save_checkpoint

__all__ = [
    "AsyncCheckpointer", "CommittedSave", "CheckpointCorruptError", "CheckpointError", "CheckpointNotFoundError", "LoadedCheckpoint",
    "LoadedWeights", "complete_checkpoints", "latest_checkpoint", "load_checkpoint",
    "load_model_weights", "read_manifest",
    "resolve_checkpoint", "resume_seed", "save_checkpoint", "step_dirname",
]
