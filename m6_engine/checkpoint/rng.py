"""RNG state in checkpoints: restored exactly when the layout is unchanged, reseeded otherwise.

Each rank saves its own streams: torch's default CPU generator, the default CUDA generator of its
device when it computes on a GPU, and every stream of its :class:`RNGTracker` (the tp-rank-specific
"model-parallel" stream). A rank's streams belong to its place in the mesh, so they map back 1:1
only onto the same (tp, pp, dp) layout on the same kind of device:

- same layout and device type: rank r gets rank r's saved states back, and a resumed run draws
  exactly the dropout masks the uninterrupted run would have drawn;
- otherwise the saved states cannot be redistributed meaningfully (a stream drives dropout on the
  shard of one tp rank, on the layers of one stage); the streams are reseeded with
  ``seed_parallel_rng(resume_seed(seed, step), state)`` when the caller passes the run's ``seed``,
  so the continued run is reproducible for that layout, and left untouched when it does not.
"""

import hashlib

import torch

from m6_engine.parallel.random import RNGTracker, seed_parallel_rng
from m6_engine.parallel.state import ParallelState

RESTORED, RESEEDED, UNCHANGED = "restored", "reseeded", "unchanged"


def rng_key(rank: int) -> str:
    return f"rng.rank{rank:05d}"


def capture(state: ParallelState, tracker: RNGTracker | None) -> dict:
    """This rank's RNG streams (picklable)."""
    cuda = torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None
    return {"device_type": state.device.type, "cpu": torch.get_rng_state(), "cuda": cuda,
            "tracker": tracker.get_states() if tracker is not None else None}


def restore(saved: dict, state: ParallelState, tracker: RNGTracker | None) -> bool:
    """Put back states from :func:`capture`; False (nothing changed) when they cannot map 1:1:
    another device type, or a tracker now but none saved."""
    if saved["device_type"] != state.device.type or (tracker is not None and saved["tracker"] is None):
        return False
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] is not None:
        torch.cuda.set_rng_state(saved["cuda"], state.device)
    if tracker is not None:
        tracker.set_states(saved["tracker"])
    return True


def resume_seed(seed: int, step: int) -> int:
    """Base seed of a run resumed at ``step`` under a new layout: a stable hash of (seed, step),
    below 2^62 so ``seed_parallel_rng``'s per-rank offsets stay in range."""
    digest = hashlib.sha256(f"{seed}/resume/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def reseed(seed: int, step: int, state: ParallelState, tracker: RNGTracker | None) -> None:
    """Seed the default stream and the tracker's streams from (seed, step) (see module doc)."""
    fresh = seed_parallel_rng(resume_seed(seed, step), state)
    if tracker is not None:
        tracker.set_states(fresh.get_states())
