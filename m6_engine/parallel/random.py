"""RNG streams for tensor parallelism, and activation checkpointing that replays them.

Two kinds of randomness (Megatron's scheme):
- the *default* stream (torch's global CPU and CUDA generators), seeded identically on every tp
  rank, drives dropout on tensors that are replicated across tp (e.g. after a row-parallel layer);
- named streams held by an :class:`RNGTracker`; the "model-parallel" stream is seeded differently
  per tp rank and drives dropout on tp-sharded tensors (e.g. attention probabilities of the local
  heads), entered with ``with tracker.fork():``.

Seeds, from one base ``seed``: default = seed + 100 * pp_rank (stages differ, tp and dp ranks
agree); model-parallel = seed + 2718 + 100 * pp_rank + tp_rank. The tracker is a value passed to
whoever needs it; only the default stream is process-global, because torch's dropout draws from it.
A stream is a CPU generator state plus, when the tracker's device is a GPU, that GPU's generator
state (dropout on CUDA tensors draws from the latter).

:func:`checkpoint` runs a function without keeping its activations and recomputes it in backward
after restoring the default and tracked RNG states of the first run, so dropout masks (and thus
gradients) are exactly those of the un-checkpointed run.
"""

import contextlib
from dataclasses import dataclass

import torch

from m6_engine.parallel.state import ParallelState

MODEL_PARALLEL_STREAM = "model-parallel"


@dataclass(frozen=True)
class _GeneratorStates:
    """One RNG stream: the CPU generator state, and the CUDA device's when computing on CUDA."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None


def _current_default(device: torch.device) -> _GeneratorStates:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return _GeneratorStates(torch.get_rng_state(), cuda)


def _set_default(states: _GeneratorStates, device: torch.device) -> None:
    torch.set_rng_state(states.cpu)
    if states.cuda is not None:
        torch.cuda.set_rng_state(states.cuda, device)


def _seeded(seed: int, device: torch.device) -> _GeneratorStates:
    cpu = torch.Generator(device="cpu").manual_seed(seed).get_state()
    cuda = None
    if device.type == "cuda":
        cuda = torch.Generator(device=device).manual_seed(seed).get_state()
    return _GeneratorStates(cpu, cuda)


class RNGTracker:
    """Named RNG streams for one compute device; ``fork(name)`` makes a stream the default (CPU
    generator, and the device's CUDA generator) for the duration of a block."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._streams: dict[str, _GeneratorStates] = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` from ``seed``; names must be unique."""
        if name in self._streams:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._streams[name] = _seeded(seed, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_STREAM):
        """Draw from stream ``name`` inside the block; the default stream is left untouched."""
        if name not in self._streams:
            raise KeyError(f"unknown RNG stream {name!r}; streams are {sorted(self._streams)}")
        outside = _current_default(self.device)
        _set_default(self._streams[name], self.device)
        try:
            yield
        finally:
            self._streams[name] = _current_default(self.device)
            _set_default(outside, self.device)

    def get_states(self) -> dict[str, _GeneratorStates]:
        """A snapshot of every stream (for checkpointing or replay)."""
        return dict(self._streams)

    def set_states(self, states: dict[str, _GeneratorStates]) -> None:
        """Restore a snapshot taken by :meth:`get_states`."""
        self._streams = dict(states)


def seed_parallel_rng(seed: int, state: ParallelState) -> RNGTracker:
    """Seed the default stream and return a tracker holding the model-parallel stream."""
    torch.manual_seed(seed + 100 * state.pp_rank)
    tracker = RNGTracker(state.device)
    tracker.add(MODEL_PARALLEL_STREAM, seed + 2718 + 100 * state.pp_rank + state.tp_rank)
    return tracker


@dataclass(frozen=True)
class _RNGSnapshot:
    device: torch.device
    default: _GeneratorStates
    tracked: dict | None


def _snapshot(tracker: RNGTracker | None) -> _RNGSnapshot:
    if tracker is not None:
        device = tracker.device
    else:  # no tracker: the CUDA generator matters once CUDA is in use
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() \
            else torch.device("cpu")
    return _RNGSnapshot(device, _current_default(device),
                        tracker.get_states() if tracker is not None else None)


def _restore(snapshot: _RNGSnapshot, tracker: RNGTracker | None) -> None:
    _set_default(snapshot.default, snapshot.device)
    if tracker is not None:
        tracker.set_states(snapshot.tracked)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tracker, *args):
        ctx.fn, ctx.tracker = fn, tracker
        ctx.rng = _snapshot(tracker)
        ctx.tensor_index = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.others = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_index))
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.others)
        for i, saved in zip(ctx.tensor_index, ctx.saved_tensors):
            args[i] = saved.detach().requires_grad_(saved.requires_grad)
        after_forward = _snapshot(ctx.tracker)
        _restore(ctx.rng, ctx.tracker)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*args)
        finally:
            _restore(after_forward, ctx.tracker)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if torch.is_tensor(a) and a.requires_grad else None for a in args)
        return (None, None) + input_grads


def checkpoint(fn, *args, tracker: RNGTracker | None = None):
    """``fn(*args)`` without keeping its activations; recomputed in backward with the same RNG.

    ``fn`` returns a tensor or a tuple of tensors; non-tensor ``args`` are passed through. The
    default stream and every stream of ``tracker`` are saved before the first run and restored for
    the recomputation, then put back, so dropout masks and the RNG sequence after the call are
    those of an un-checkpointed run.
    """
    return _Checkpoint.apply(fn, tracker, *args)
