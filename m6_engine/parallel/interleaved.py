"""Interleaved 1F1B (Megatron's virtual pipeline): each pp rank holds V model chunks.

Layout. The model is cut into ``V * pp`` virtual stages; pp rank ``k`` holds chunk ``c`` = virtual
stage ``c * pp + k``. An activation leaves chunk ``c`` of rank ``k`` for chunk ``c`` of rank
``k + 1``, and from the last rank for chunk ``c + 1`` of rank 0 (a ring over the pp group); its
gradient comes back the same way. Virtual stage 0 (rank 0, chunk 0) holds the embedding and
virtual stage ``V * pp - 1`` (rank pp - 1, chunk V - 1) the loss, so the first and last *rank*
still share the tied word embedding.

Order of one rank's ``V * m`` forwards (and backwards): micro-batches go through the chunks in
groups of pp, so forward number ``i`` runs chunk ``(i // pp) % V`` on micro-batch
``(i // (pp V)) pp + i % pp``; backwards take the chunks in reverse. Rank ``k`` runs
``w = min(2 (pp - k - 1) + (V - 1) pp, V m)`` warm-up forwards, then alternates one forward and
one backward, then runs the ``w`` remaining backwards (Megatron's counts). ``m`` must be a multiple
of pp (the groups are whole). The bubble is (pp - 1) / (V m) of the ideal step instead of
(pp - 1) / m, at the price of V times more p2p transfers.

Transfers. :func:`schedule_table` turns the per-rank orders into a table of *ticks*: a global
simulation where every rank runs its next step (:func:`rank_steps`: a warm-up forward, a
cool-down backward, or in the steady phase a forward and a backward together, as Megatron's
steady iteration, so neighbours stay in phase when a backward outlasts a forward) as soon as its
inputs have arrived, after which every rank exchanges what the tick produced with its neighbours
in one batch (its own outputs and what its neighbours produced for it, each side sorted the same
way). Both sides of every transfer post it in the same tick, so each batch has its counterpart
and nothing depends on how a backend matches messages beyond their order (NCCL matches the sends
and receives of one pair in order; in a pp = 2 ring the previous and next rank are one rank, and
an activation and a gradient may cross in one tick). Ticks whose batch is empty cost nothing; a
rank that waits for an input simply has ticks without an operation. The table is pure (tests check it without processes), and
:func:`forward_backward_interleaved` executes one rank's column of it.
"""

import itertools
from dataclasses import dataclass

import torch

from m6_engine.parallel.p2p import PipeChannel, TensorSpec
from m6_engine.parallel.state import ParallelState

FORWARD, BACKWARD = "forward", "backward"
# What crosses a boundary, as p2p errors name it.
ACTIVATION, GRADIENT = "forward activation", "backward gradient"


@dataclass(frozen=True)
class Op:
    """One forward or backward of one micro-batch through one chunk of a rank."""

    kind: str            # FORWARD or BACKWARD
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Transfer:
    """A tensor crossing a (virtual) stage boundary: an activation for chunk ``chunk`` of pp rank
    ``dst`` (the input of its forward), or a gradient for it (the output gradient of its backward)."""

    kind: str            # ACTIVATION or GRADIENT
    src: int
    dst: int
    chunk: int           # the receiving chunk
    microbatch: int


@dataclass(frozen=True)
class Tick:
    """What one rank does in one tick: its operations (none, one, or in the steady phase one
    forward and one backward), then one batch of transfers, sends and receives each sorted by
    (kind, chunk, micro-batch) so that both sides of a pair list them in the same order."""

    ops: tuple[Op, ...]
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]


def check_interleaving(pp: int, virtual_stages: int, num_microbatches: int) -> None:
    """ValueError naming what is wrong when the interleaved schedule cannot run this shape."""
    for name, value, least in (("pp", pp, 2), ("virtual_stages", virtual_stages, 2),
                               ("num_microbatches", num_microbatches, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"interleaved 1F1B: {name} must be an integer >= {least}, got {value!r}")
    if num_microbatches % pp:
        raise ValueError(f"interleaved 1F1B runs micro-batches in groups of pp: num_microbatches = "
                         f"{num_microbatches} is not a multiple of pp = {pp} (choose global_batch = "
                         f"micro_batch * dp * a multiple of pp)")


def warmup_forwards(pp: int, virtual_stages: int, num_microbatches: int, rank: int) -> int:
    """Forwards rank ``rank`` runs before its first backward."""
    return min(2 * (pp - rank - 1) + (virtual_stages - 1) * pp, virtual_stages * num_microbatches)


def _nth(i: int, pp: int, virtual_stages: int, kind: str) -> Op:
    chunk = (i // pp) % virtual_stages
    if kind == BACKWARD:
        chunk = virtual_stages - 1 - chunk
    return Op(kind, chunk, (i // (pp * virtual_stages)) * pp + i % pp)


def rank_order(pp: int, virtual_stages: int, num_microbatches: int, rank: int, *,
               forward_only: bool = False) -> list[Op]:
    """The operations of rank ``rank`` in the order it runs them (module docstring)."""
    check_interleaving(pp, virtual_stages, num_microbatches)
    total = virtual_stages * num_microbatches
    forwards = [_nth(i, pp, virtual_stages, FORWARD) for i in range(total)]
    if forward_only:
        return forwards
    backwards = [_nth(i, pp, virtual_stages, BACKWARD) for i in range(total)]
    w = warmup_forwards(pp, virtual_stages, num_microbatches, rank)
    steady = [op for pair in zip(forwards[w:], backwards) for op in pair]
    return forwards[:w] + steady + backwards[total - w:]


def _output_transfer(op: Op, rank: int, pp: int, virtual_stages: int) -> Transfer | None:
    """What ``op`` on ``rank`` sends: its activation downstream or its input gradient upstream;
    None at the ends of the virtual pipeline."""
    stage = op.chunk * pp + rank
    if op.kind == FORWARD:
        if stage == virtual_stages * pp - 1:
            return None
        dst = (rank + 1) % pp
        return Transfer(ACTIVATION, rank, dst, op.chunk + (1 if dst == 0 else 0), op.microbatch)
    if stage == 0:
        return None
    dst = (rank - 1) % pp
    return Transfer(GRADIENT, rank, dst, op.chunk - (1 if rank == 0 else 0), op.microbatch)


def _sender_chunk(t: Transfer) -> int:
    """The chunk of ``t.src`` whose operation produced ``t``."""
    if t.kind == ACTIVATION:
        return t.chunk - (1 if t.dst == 0 else 0)
    return t.chunk + (1 if t.src == 0 else 0)


def _input_needed(op: Op, rank: int, pp: int, virtual_stages: int) -> tuple | None:
    """The (kind, chunk, microbatch) ``op`` must have received first, None when it needs nothing
    (a forward of virtual stage 0, a backward of the last virtual stage: it starts from the loss)."""
    stage = op.chunk * pp + rank
    if op.kind == FORWARD:
        return None if stage == 0 else (ACTIVATION, op.chunk, op.microbatch)
    return None if stage == virtual_stages * pp - 1 else (GRADIENT, op.chunk, op.microbatch)


def rank_steps(pp: int, virtual_stages: int, num_microbatches: int, rank: int, *,
               forward_only: bool = False) -> list[tuple[Op, ...]]:
    """:func:`rank_order` cut into what one tick runs: each warm-up forward and cool-down
    backward alone, the steady phase's forward and backward together (as Megatron's steady
    iteration), so neighbours both run a forward and a backward between two exchanges."""
    order = rank_order(pp, virtual_stages, num_microbatches, rank, forward_only=forward_only)
    if forward_only:
        return [(op,) for op in order]
    w = warmup_forwards(pp, virtual_stages, num_microbatches, rank)
    steady = len(order) - 2 * w
    return ([(op,) for op in order[:w]] + [tuple(order[w + i:w + i + 2]) for i in range(0, steady, 2)]
            + [(op,) for op in order[w + steady:]])


def _key(t: Transfer) -> tuple:
    return t.kind, t.chunk, t.microbatch


def schedule_table(pp: int, virtual_stages: int, num_microbatches: int, *,
                   forward_only: bool = False) -> list[list[Tick]]:
    """Per rank, its ticks (module docstring); every rank's list has the same length.

    Raises RuntimeError if the orders could deadlock (no rank can make progress); the tests run
    this for many shapes.
    """
    steps = [rank_steps(pp, virtual_stages, num_microbatches, k, forward_only=forward_only)
             for k in range(pp)]
    done = [0] * pp
    arrived: list[set] = [set() for _ in range(pp)]   # inputs received, not yet consumed
    forwarded: list[set] = [set() for _ in range(pp)]
    table: list[list[Tick]] = [[] for _ in range(pp)]
    while any(done[k] < len(steps[k]) for k in range(pp)):
        ran: list[tuple[Op, ...]] = []
        for k in range(pp):
            ops = steps[k][done[k]] if done[k] < len(steps[k]) else ()
            needs = [_input_needed(op, k, pp, virtual_stages) for op in ops]
            if not all(need is None or need in arrived[k] for need in needs):
                ran.append(())
                continue
            for op, need in zip(ops, needs):
                if op.kind == BACKWARD and (op.chunk, op.microbatch) not in forwarded[k]:
                    raise RuntimeError(f"rank {k}: backward of chunk {op.chunk}, micro-batch "
                                       f"{op.microbatch} is ordered before its forward")
                if op.kind == FORWARD:
                    forwarded[k].add((op.chunk, op.microbatch))
                arrived[k].discard(need)
            done[k] += 1 if ops else 0
            ran.append(ops)
        if not any(ran):
            raise RuntimeError(f"interleaved 1F1B with pp = {pp}, V = {virtual_stages}, m = "
                               f"{num_microbatches} deadlocks: no rank can run its next operation")
        sent = [sorted((t for op in ops if (t := _output_transfer(op, k, pp, virtual_stages))),
                       key=_key) for k, ops in enumerate(ran)]
        for k in range(pp):
            recvs = tuple(sorted((t for out in sent for t in out if t.dst == k), key=_key))
            for t in recvs:
                arrived[k].add(_key(t))
            table[k].append(Tick(ran[k], tuple(sent[k]), recvs))
    return table


def forward_backward_interleaved(*, forward_step, data_iterator, model, num_microbatches: int,
                                 state: ParallelState, tensor_spec: TensorSpec | None = None,
                                 forward_only: bool = False, check_shapes: bool = False,
                                 finalize_grads=None, no_sync=None):
    """Interleaved 1F1B over the chunks ``model`` (a sequence of V >= 2 modules, chunk ``c``
    being virtual stage ``c * pp + pp_rank``); the contract of ``schedules.forward_backward``.

    ``forward_step`` is called with one chunk at a time; each chunk reads the step's micro-batches
    in order from its own copy of ``data_iterator`` (``itertools.tee``: every chunk needs the
    batch, for its masks and, on the last virtual stage, its labels). Every backward but the last
    of the step (over all chunks) runs under ``no_sync``; ``StepResult.peak_live_microbatches``
    counts the micro-batches live in any chunk at once.
    """
    from m6_engine.parallel.schedules import _runner

    chunks = list(model)
    check_interleaving(state.pp_size, len(chunks), num_microbatches)
    iterators = itertools.tee(data_iterator, len(chunks))
    channel = PipeChannel(state, tensor_spec, check_shapes)
    run = _runner(forward_step, iterators, chunks, num_microbatches, state, forward_only, channel,
                  finalize_grads, no_sync)
    inbox: dict[tuple, torch.Tensor] = {}
    rank = state.pp_rank
    for tick in schedule_table(state.pp_size, len(chunks), num_microbatches,
                               forward_only=forward_only)[rank]:
        produced = {}
        for op in tick.ops:
            if op.kind == FORWARD:
                produced[(FORWARD, op.chunk, op.microbatch)] = run.forward(
                    inbox.pop((ACTIVATION, op.chunk, op.microbatch), None), op.chunk)
            else:
                produced[(BACKWARD, op.chunk, op.microbatch)] = run.backward(
                    inbox.pop((GRADIENT, op.chunk, op.microbatch), None), op.chunk)
        if not tick.sends and not tick.recvs:
            continue
        sends = [(t.dst, produced[(FORWARD if t.kind == ACTIVATION else BACKWARD, _sender_chunk(t),
                                   t.microbatch)], t.kind) for t in tick.sends]
        received = run.p2p("transfer", sends, [(t.src, t.kind) for t in tick.recvs])
        for t, tensor in zip(tick.recvs, received):
            inbox[_key(t)] = tensor
        for t in tick.sends:   # activations sent downstream keep only their graph
            if t.kind == ACTIVATION:
                run.sent(produced[(FORWARD, _sender_chunk(t), t.microbatch)], _sender_chunk(t))
    if inbox:
        raise RuntimeError(f"interleaved 1F1B: rank {rank} received tensors no operation used: "
                           f"{sorted(inbox)}")
    return run.finish()
