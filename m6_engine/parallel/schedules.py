"""Pipeline schedules: one optimizer step's forward and backward over ``num_microbatches``.

Every schedule has the same keyword-only signature (see :func:`forward_backward`):

- ``forward_step(data_iterator, model, input_tensor) -> Tensor`` runs this stage on the next
  micro-batch. ``input_tensor`` is None on the first stage, else the activation received from the
  previous stage. It returns the activation for the next stage (shape ``tensor_spec``, a fresh
  tensor, not a view), or on the last stage the micro-batch's scalar loss (its mean over tokens).
- The last stage backpropagates loss / num_microbatches, so gradients accumulate to those of the
  mean loss; ``StepResult.losses`` holds the micro-batch losses (last stage only).
- Gradient reduction belongs to the caller (``parallel.grad_sync``): every backward but the last
  runs in ``no_sync()``, and ``finalize_grads()`` runs once after the last one (for an M6 stage:
  ``**model_grad_sync(model, state)``: DataParallel's reduction, then the tied embedding's sum).
  Both are required for a training step. ``forward_only`` (evaluation) runs forwards under
  ``no_grad`` and needs neither.

Schedules. ``"1f1b"`` (non-interleaved): stage ``k`` of ``pp`` runs ``w = min(pp - k - 1, m)``
warm-up forwards, then alternates one forward / one backward, then ``w`` cool-down backwards, so it
holds at most ``min(pp - k, m)`` micro-batches of activations. ``"gpipe"``: all forwards, then all
backwards (holds ``m``). With pp == 1 both are the plain accumulation loop. Interleaved 1F1B
(a list of V >= 2 model chunks per rank, ``parallel.interleaved``): the same 1F1B over V * pp
virtual stages, bubble (pp - 1) / (V m) instead of (pp - 1) / m. An activation sent
downstream has its storage released right after the send (only its autograd graph is kept):
``tensor.data`` becomes a one-element tensor expanded to the original shape, so the shape metadata
that ``torch.autograd.backward`` checks the incoming gradient against is kept.
"""

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from m6_engine.parallel.interleaved import forward_backward_interleaved
from m6_engine.parallel.p2p import PipeChannel, TensorSpec
from m6_engine.parallel.state import ParallelState


@dataclass(frozen=True)
class ScheduleTimers:
    """Seconds this stage spent in one call: compute (forward, backward), p2p, gradient sync."""

    forward_s: float
    backward_s: float
    p2p_s: float
    grad_sync_s: float
    total_s: float

    @property
    def busy_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def bubble_fraction(self) -> float:
        """Share of the call this stage was not computing (pipeline bubble + communication)."""
        return 1.0 - self.busy_s / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class StepResult:
    """What one schedule call returns; ``losses`` is empty except on the last stage."""

    losses: list[torch.Tensor]
    timers: ScheduleTimers
    peak_live_microbatches: int
    """Most micro-batches whose forward had run and whose backward had not, at any time."""

    @property
    def loss(self) -> torch.Tensor | None:
        """Mean micro-batch loss on the last stage, else None."""
        return torch.stack(self.losses).mean() if self.losses else None


class _Clock:
    """Accumulates span durations; on CUDA with events resolved once, at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self.events: list = []

    @contextlib.contextmanager
    def span(self, kind: str):
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((kind, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - t0

    def seconds(self, kind: str) -> float:
        if self.events:
            torch.cuda.synchronize()
            for k, start, end in self.events:
                self.totals[k] = self.totals.get(k, 0.0) + start.elapsed_time(end) / 1000.0
            self.events.clear()
        return self.totals.get(kind, 0.0)


def _release_storage(output: torch.Tensor) -> None:
    """Free an activation already sent downstream, keeping its shape and autograd graph."""
    if output._base is not None:
        raise ValueError("forward_step returned a view as the stage output; return a fresh tensor "
                         "(e.g. .contiguous() or .clone()) so its storage can be freed after sending")
    output.data = torch.empty((), dtype=output.dtype, device=output.device).expand(output.shape)


def _runner(forward_step, data_iterator, model, num_microbatches, state, forward_only, channel,
            finalize_grads, no_sync) -> "_StageRunner":
    """A schedule's stage runner; a training step must say who reduces its gradients. ``model`` is
    one stage, or for interleaved 1F1B the list of this rank's chunks, with ``data_iterator`` then
    one iterator per chunk."""
    if not forward_only and (finalize_grads is None or no_sync is None):
        raise ValueError("a training step needs finalize_grads and no_sync: who reduces the gradients "
                         "(**m6_engine.parallel.model_grad_sync(model, state) for a stage)")
    chunks = tuple(model) if isinstance(model, (list, tuple)) else (model,)
    iterators = tuple(data_iterator) if isinstance(model, (list, tuple)) else (data_iterator,)
    return _StageRunner(forward_step, iterators, chunks, num_microbatches, state, forward_only, channel,
                        finalize_grads or (lambda: None), no_sync or contextlib.nullcontext)


@dataclass
class _StageRunner:
    """One rank's micro-batch steps: timing, loss scaling, gradient-sync control, and per model
    chunk the queue of micro-batches whose forward ran and whose backward has not (``pending``).
    One chunk except under interleaved 1F1B; the loss is the last virtual stage's: the last
    chunk of the last rank."""

    forward_step: object
    data_iterators: tuple
    chunks: tuple
    num_microbatches: int
    state: ParallelState
    forward_only: bool
    channel: PipeChannel | None
    finalize_grads: Callable[[], None]       # the caller's gradient reduction (parallel.grad_sync)
    no_sync: Callable[[], ContextManager]
    clock: _Clock = field(init=False)
    pending: list = field(init=False)
    losses: list = field(default_factory=list)
    backwards_done: int = 0
    peak_live: int = 0

    def __post_init__(self):
        self.pending = [deque() for _ in self.chunks]
        # The "total" span is opened here and closed in finish(): the whole call is measured.
        self.clock = _Clock(self.state.device)
        self.total_span = self.clock.span("total")
        self.total_span.__enter__()

    def holds_loss(self, chunk: int) -> bool:
        return self.state.is_last_stage and chunk == len(self.chunks) - 1

    def p2p(self, direction: str, *args):
        with self.clock.span("p2p"):
            return getattr(self.channel, direction)(*args)

    def forward(self, input_tensor, chunk: int = 0):
        """Run forward_step on the chunk's next micro-batch and queue it for backward."""
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_()
        grad_mode = torch.no_grad() if self.forward_only else contextlib.nullcontext()
        with self.clock.span("forward"), grad_mode:
            output = self.forward_step(self.data_iterators[chunk], self.chunks[chunk], input_tensor)
        if self.holds_loss(chunk):
            if output.dim() != 0:
                raise ValueError(f"forward_step on the last stage must return the scalar "
                                 f"micro-batch loss, got shape {tuple(output.shape)}")
            self.losses.append(output.detach())
            output = output / self.num_microbatches
        if not self.forward_only:
            self.pending[chunk].append((input_tensor, output))
            self.peak_live = max(self.peak_live, sum(len(p) for p in self.pending))
        return output

    def backward(self, output_grad, chunk: int = 0):
        """Backpropagate the chunk's oldest pending micro-batch (the step's last backward, over all
        chunks, with data-parallel sync enabled); returns the gradient of its input, None on the
        first stage."""
        input_tensor, output = self.pending[chunk].popleft()
        is_last = self.backwards_done == self.num_microbatches * len(self.chunks) - 1
        sync_mode = contextlib.nullcontext() if is_last else self.no_sync()
        with self.clock.span("backward"), sync_mode:
            torch.autograd.backward(output, grad_tensors=output_grad)
        self.backwards_done += 1
        return None if input_tensor is None else input_tensor.grad

    def sent(self, output, chunk: int = 0) -> None:
        """Called after ``output`` went downstream: keep only its graph."""
        if not self.forward_only and not self.holds_loss(chunk):
            _release_storage(output)

    def receive_forward_send(self) -> None:
        """Receive an activation, run its forward, send the output downstream."""
        output = self.forward(self.p2p("recv_forward"))
        self.p2p("send_forward", output)
        self.sent(output)

    def receive_backward_send(self) -> None:
        """Receive the oldest pending micro-batch's output gradient, backward, send upstream."""
        output_grad = self.p2p("recv_backward")
        self.p2p("send_backward", self.backward(output_grad))

    def finish(self) -> StepResult:
        if not self.forward_only:
            with self.clock.span("grad_sync"):
                self.finalize_grads()
        self.total_span.__exit__(None, None, None)
        c = self.clock.seconds
        timers = ScheduleTimers(c("forward"), c("backward"), c("p2p"), c("grad_sync"), c("total"))
        return StepResult(self.losses, timers, self.peak_live)


def forward_backward_no_pipelining(*, forward_step, data_iterator, model, num_microbatches: int,
                                   state: ParallelState, tensor_spec: TensorSpec | None = None,
                                   forward_only: bool = False, check_shapes: bool = False,
                                   finalize_grads=None, no_sync=None) -> StepResult:
    """pp == 1: forward and backward each micro-batch in turn, accumulating gradients."""
    run = _runner(forward_step, data_iterator, model, num_microbatches, state, forward_only, None,
                  finalize_grads, no_sync)
    for _ in range(num_microbatches):
        run.forward(None)
        if not forward_only:
            run.backward(None)
    return run.finish()


def forward_backward_gpipe(*, forward_step, data_iterator, model, num_microbatches: int,
                           state: ParallelState, tensor_spec: TensorSpec | None = None,
                           forward_only: bool = False, check_shapes: bool = False,
                           finalize_grads=None, no_sync=None) -> StepResult:
    """All forwards, then all backwards in the same micro-batch order (holds m activations)."""
    run = _runner(forward_step, data_iterator, model, num_microbatches, state, forward_only,
                  PipeChannel(state, tensor_spec, check_shapes), finalize_grads, no_sync)
    for _ in range(num_microbatches):
        run.receive_forward_send()
    while run.pending[0]:
        run.receive_backward_send()
    return run.finish()


def forward_backward_1f1b(*, forward_step, data_iterator, model, num_microbatches: int,
                          state: ParallelState, tensor_spec: TensorSpec | None = None,
                          forward_only: bool = False, check_shapes: bool = False,
                          finalize_grads=None, no_sync=None) -> StepResult:
    """Non-interleaved 1F1B: warm-up forwards, steady one-forward-one-backward, cool-down."""
    run = _runner(forward_step, data_iterator, model, num_microbatches, state, forward_only,
                  PipeChannel(state, tensor_spec, check_shapes), finalize_grads, no_sync)
    warmup = min(state.pp_size - state.pp_rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    for _ in range(warmup):
        run.receive_forward_send()
    input_tensor = run.p2p("recv_forward") if steady > 0 else None
    for i in range(steady):
        last = i == steady - 1
        output = run.forward(input_tensor)
        if forward_only:
            run.p2p("send_forward", output)
            input_tensor = None if last else run.p2p("recv_forward")
            continue
        output_grad = run.p2p("send_forward_recv_backward", output)
        run.sent(output)
        input_grad = run.backward(output_grad)
        if last:
            run.p2p("send_backward", input_grad)
        else:
            input_tensor = run.p2p("send_backward_recv_forward", input_grad)
    while run.pending[0]:
        run.receive_backward_send()
    return run.finish()


SCHEDULES = {"1f1b": forward_backward_1f1b, "gpipe": forward_backward_gpipe}


def forward_backward(schedule: str, *, forward_step, data_iterator, model, num_microbatches: int,
                     state: ParallelState, tensor_spec: TensorSpec | None = None,
                     forward_only: bool = False, check_shapes: bool = False,
                     finalize_grads: Callable[[], None] | None = None,
                     no_sync: Callable[[], ContextManager] | None = None) -> StepResult:
    """Run one step's micro-batches with ``schedule`` ("1f1b" or "gpipe"); see the module doc.

    ``model`` is this rank's stage, or a list of its V model chunks: with V >= 2 that runs the
    interleaved 1F1B schedule (``parallel.interleaved``; schedule "1f1b", pp >= 2, num_microbatches
    a multiple of pp), with V == 1 the list's one stage as usual.

    ``tensor_spec`` (shape and dtype of the activation between stages) is required when pp > 1;
    ``check_shapes`` exchanges shape metadata before every transfer (debugging). A training step
    (not ``forward_only``) needs ``finalize_grads`` and ``no_sync`` (``parallel.grad_sync``; for a
    model with no gradient reduction, ``lambda: None`` and ``contextlib.nullcontext``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if state.pp_size > 1 and tensor_spec is None:
        raise ValueError("tensor_spec (the activation shape and dtype between stages) is required "
                         f"when pp = {state.pp_size} > 1")
    if isinstance(model, (list, tuple)):   # this rank's model chunks: interleaved 1F1B
        if schedule != "1f1b":
            raise ValueError(f"a list of model chunks runs the interleaved 1F1B schedule; schedule "
                             f"{schedule!r} takes one stage per rank")
        if len(model) > 1:
            run = forward_backward_interleaved
        else:
            model = model[0]
            run = forward_backward_no_pipelining if state.pp_size == 1 else SCHEDULES[schedule]
    else:
        run = forward_backward_no_pipelining if state.pp_size == 1 else SCHEDULES[schedule]
    return run(forward_step=forward_step, data_iterator=data_iterator, model=model,
               num_microbatches=num_microbatches, state=state, tensor_spec=tensor_spec,
               forward_only=forward_only, check_shapes=check_shapes, finalize_grads=finalize_grads,
               no_sync=no_sync)
