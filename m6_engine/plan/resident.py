"""What a rank keeps between steps, per ZeRO stage: parameters, fp32 gradients, optimizer state.

Notation: P the parameters of one tp rank of one pipeline rank (all its chunks with interleaved
1F1B), n = dp, e bytes per parameter element, U the elements this dp rank owns (about P / n).

**Parameters** of pipeline rank ``k``, tp rank ``r`` (``model.m6``, ``model.block``), counted over
the layers of its chunks (``stage_layer_range(num_layers, pp, k, V, c)`` for c < V):

    per block   (3h^2 + 3h + h^2 + hf + f + fh) / t   sharded: QKV, out, FC1 (+ biases), FC2
              + h + h + 4h                             replicated: out / FC2 biases, two LayerNorms
    first rank  V h / t (word) + P h (positions) + G h (segments) + F h + h (patch projection)
    last rank   2h (final LayerNorm) [+ 2h + 2, the matching head] + V h / t when pp > 1 (the
                tied head's copy of the word table)

**The gradient buffer** is ``parallel.data_parallel``'s, computed here with its own pure layout
function (``layout_grad_buffer``) on the parameters in the order the stage registers them
(:func:`stage_parameter_numels`), reversed: buckets of at least ``BUCKET_NUMEL`` elements (ZeRO-3:
one bucket per block plus a *root* bucket of everything outside the blocks), each padded to a
multiple of n * 128. With pp > 1 a bucket holding the tied word embedding (first and last rank)
is held whole at every stage, because the tied sum over the two ranks needs the whole gradient.

    stage   weights                 gradients (fp32)                 optimizer (fp32)
    0       e P                     4 x buffer                       12 P (8 P for fp32 weights)
    1       e x buffer              4 x buffer                       12 U (8 U)
    2       e x buffer              4 (sum of shards + tied bucket)  12 U (8 U)
            + staging: the full-size gradients of the buckets being written or reduce-scattered:
              the largest 1 + STAGED_IN_FLIGHT buckets, plus at pp = 1 the word table's bucket
              (the head writes it first in backward, the lookup last: open all backward)
    3       e (sum of shards)       as stage 2                       12 U (8 U)
            + gathered: the root bucket (whole from the step's first forward to its end) and
              two layer buckets at once (the running one and the prefetched one), e bytes each

(at stages 1 and 2 the parameters live in one flat buffer laid out like the gradients',
``optim.zero.ParamBuffer``, padding included). U is exactly what ``owned_pieces`` gives dp rank 0 (the fullest: padding belongs to the last
ranks). **Offload** ("cpu", stages 0-2): the device keeps no optimizer state; the host keeps the
fp32 master and both moments of the owned elements (12 U), a pinned buffer of their fp32
gradients (4 U) and one of the half-precision weights sent back (e U): (16 + e) U host bytes.
Checked by tests/test_plan.py against ``DataParallel.grad_buffer_bytes()``, ``peak_staging_numel``,
``ShardedParameters.shards`` / ``peak_gathered_numel`` and the optimizer's ``state_bytes()`` of
real small stages (offload against this arithmetic only: its engine side is being built).
"""

import functools
from dataclasses import dataclass

from m6_engine.config import ModelConfig
from m6_engine.model.m6 import stage_layer_range
from m6_engine.parallel.data_parallel import BufferLayout, layout_grad_buffer, owned_pieces

BUCKET_NUMEL = 40_000_000
"""``DataParallel``'s default ``bucket_numel``, the Trainer's (tests check they agree)."""
BUCKET_ALIGN = 128
"""``DataParallel``'s default ``align``: buckets are padded to multiples of dp * this."""
STAGED_IN_FLIGHT = 2
"""``DataParallel.STAGED_IN_FLIGHT``: ZeRO-2 reduce-scatters in flight before the oldest is waited for."""
ROOT = -1
"""Unit of the parameters outside every block (``parallel.sharded_params.ROOT``)."""


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ParamEntry:
    """One parameter of a stage, in registration order."""

    numel: int
    unit: int
    """Global index of its block, or ROOT."""
    tp_sharded: bool
    tied: bool
    """The word embedding on a stage with the head or the lookup (``parallel.tied``)."""
    position_wise: bool = False
    """Replicated, and sees only the rank's positions under sequence parallelism (the blocks'
    LayerNorms, the position / segment tables, the patch projection): its gradient is then summed
    over tp (``ParamRole.sequence_parallel``, ``parallel.grad_sync``)."""


def rank_layer_ranges(config: ModelConfig, pp: int, stage_id: int, virtual_stages: int = 1) -> list[range]:
    """The blocks of each chunk of pipeline rank ``stage_id`` (one range when V = 1)."""
    return [stage_layer_range(config.num_layers, pp, stage_id, virtual_stages, c)
            for c in range(virtual_stages)]


def _block_entries(config: ModelConfig, tp: int, layer: int) -> list[ParamEntry]:
    h, f = config.hidden_size, config.ffn_size
    ln, sharded, replicated = "ln", "sharded", "replicated"
    shapes = [(h, ln), (h, ln),                                # ln1
              (3 * h * h // tp, sharded), (3 * h // tp, sharded),    # attention.qkv
              (h * h // tp, sharded), (h, replicated),         # attention.out
              (h, ln), (h, ln),                                # ln2
              (f * h // tp, sharded), (f // tp, sharded),      # mlp.fc1
              (h * f // tp, sharded), (h, replicated)]         # mlp.fc2
    return [ParamEntry(n, layer, kind == sharded, False, kind == ln) for n, kind in shapes]


@functools.cache
def stage_parameter_numels(config: ModelConfig, tp: int, pp: int, stage_id: int,
                           virtual_stages: int = 1) -> tuple[ParamEntry, ...]:
    """Parameters of one tp rank of pipeline rank ``stage_id`` in the order the stage (``M6Model``,
    or ``StageChunks`` with V > 1) registers them: embedding, blocks, final LayerNorm, matching head."""
    h = config.hidden_size
    first, last = stage_id == 0, stage_id == pp - 1
    word = ParamEntry(config.padded_vocab_size(tp) // tp * h, ROOT, True, True)
    entries = []
    if first:
        entries.append(word)
        entries.append(ParamEntry(config.max_text_positions * h, ROOT, False, False, True))
        if config.num_segments:
            entries.append(ParamEntry(config.num_segments * h, ROOT, False, False, True))
        if config.num_patches:
            entries += [ParamEntry(config.patch_feature_dim * h, ROOT, False, False, True),
                        ParamEntry(h, ROOT, False, False, True)]
    elif last:
        entries.append(word)                       # the tied head's copy
    for layers in rank_layer_ranges(config, pp, stage_id, virtual_stages):
        for layer in layers:
            entries += _block_entries(config, tp, layer)
    if last:
        entries += [ParamEntry(h, ROOT, False, False)] * 2
        if config.itm_head:
            entries += [ParamEntry(2 * h, ROOT, False, False), ParamEntry(2, ROOT, False, False)]
    return tuple(entries)


@dataclass(frozen=True)
class StageParameters:
    """Parameters of one tp rank of one stage, by how they are split over tp."""

    sharded: int
    """This rank's shard of tp-split weights (every tp rank holds a different one)."""
    replicated: int
    """Weights every tp rank holds in full."""
    tied_copy: int
    """The last stage's copy of the first stage's word-table shard (pp > 1), a second copy."""

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.tied_copy


def stage_parameter_split(config: ModelConfig, tp: int, pp: int, stage_id: int,
                          virtual_stages: int = 1) -> StageParameters:
    """Parameters of one tp rank of pipeline rank ``stage_id`` (module docstring)."""
    entries = stage_parameter_numels(config, tp, pp, stage_id, virtual_stages)
    tied_copy = sum(p.numel for p in entries if p.tied) if stage_id == pp - 1 and pp > 1 else 0
    sharded = sum(p.numel for p in entries if p.tp_sharded) - tied_copy
    return StageParameters(sharded, sum(p.numel for p in entries if not p.tp_sharded), tied_copy)


def stage_parameters(config: ModelConfig, tp: int, pp: int, stage_id: int, virtual_stages: int = 1) -> int:
    """Parameters held by one tp rank of pipeline rank ``stage_id`` (what its memory holds, the
    tied head's copy of the word table included)."""
    return sum(p.numel for p in stage_parameter_numels(config, tp, pp, stage_id, virtual_stages))


def unique_parameters(config: ModelConfig, tp: int, pp: int) -> int:
    """Parameters of the whole model counted once: sharded ones summed over tp ranks, replicated
    ones once, the tied head copy not at all (equals ``model.flops.parameter_count``)."""
    splits = [stage_parameter_split(config, tp, pp, p) for p in range(pp)]
    return sum(split.sharded * tp + split.replicated for split in splits)


# --------------------------------------------------------------------------- the buffer

@dataclass(frozen=True)
class StageBuffer:
    """The gradient buffer of one rank (``DataParallel``'s layout) and which buckets it holds whole."""

    layout: BufferLayout
    holds_word: tuple[bool, ...]
    """Per bucket: it holds the word embedding (with pp = 1 used by the lookup and the head)."""
    whole: tuple[bool, ...]
    """Per bucket: held (and all-reduced) whole because it holds the tied word table (pp > 1)."""
    units: tuple[int, ...]
    """Per bucket, ZeRO-3: the unit (block index or ROOT); ZeRO 0-2: ROOT."""
    owned: int
    """Elements dp rank 0 owns at ZeRO >= 1 (``owned_pieces``); all parameters at stage 0."""
    owned_position_wise: int
    """Of those, elements of position-wise parameters (what sequence parallelism sums over tp)."""

    def numel(self, index: int) -> int:
        start, end = self.layout.bucket_ranges[index]
        return end - start


@functools.cache
def stage_buffer(config: ModelConfig, tp: int, pp: int, stage_id: int, virtual_stages: int, dp: int,
                 zero_stage: int) -> StageBuffer:
    """The buffer ``DataParallel`` lays out for this stage (module docstring)."""
    entries = list(stage_parameter_numels(config, tp, pp, stage_id, virtual_stages))[::-1]
    groups = None
    if zero_stage == 3:      # one bucket per unit, units in the order the buffer reaches them
        order: dict[int, list[ParamEntry]] = {}
        for p in entries:
            order.setdefault(p.unit, []).append(p)
        entries = [p for members in order.values() for p in members]
        groups = [p.unit for p in entries]
    layout = layout_grad_buffer([p.numel for p in entries], BUCKET_NUMEL, dp, BUCKET_ALIGN, groups)
    holds_word = tuple(any(entries[i].tied for i in members) for members in layout.bucket_members)
    whole = tuple(pp > 1 and word for word in holds_word)
    units = tuple(entries[members[0]].unit if groups else ROOT for members in layout.bucket_members)
    pieces = (owned_pieces(layout, dp, 0) if zero_stage >= 1
              else [(i, 0, p.numel) for i, p in enumerate(entries)])
    owned = sum(hi - lo for _, lo, hi in pieces)
    position_wise = sum(hi - lo for i, lo, hi in pieces if entries[i].position_wise)
    return StageBuffer(layout, holds_word, whole, units, owned, position_wise)


# --------------------------------------------------------------------------- per ZeRO stage

@dataclass(frozen=True)
class ResidentState:
    """Bytes of one rank's parameters, gradients and optimizer state (module docstring)."""

    parameters: int
    """Parameter elements of the stage (whole, whatever is stored)."""
    owned: int
    """Elements whose optimizer state this rank keeps."""
    weights: int
    """Stored parameter bytes between steps (ZeRO-3: this rank's shards)."""
    gathered: int
    """ZeRO-3: parameter bytes gathered at the peak inside a step."""
    gradients: int
    """fp32 gradient storage held between steps."""
    staging: int
    """ZeRO-2/3: full-size bucket gradients alive inside backward (a bound)."""
    optimizer: int
    """fp32 masters and Adam moments on the device (0 with offload)."""
    host: int
    """Host bytes of the offloaded optimizer: state and pinned transfer buffers."""


def resident_state(config: ModelConfig, *, tp: int, pp: int, stage_id: int, virtual_stages: int, dp: int,
                   zero_stage: int, offload: str, element_bytes: int) -> ResidentState:
    """Parameters, gradients and optimizer state of dp rank 0 of one (stage, tp rank) (module docstring)."""
    params = stage_parameters(config, tp, pp, stage_id, virtual_stages)
    buffer = stage_buffer(config, tp, pp, stage_id, virtual_stages, dp, zero_stage)
    sizes = [buffer.numel(k) for k in range(len(buffer.whole))]
    sharded_grads = zero_stage >= 2
    held = [n if (whole or not sharded_grads) else n // dp for n, whole in zip(sizes, buffer.whole)]
    staged = sharded_grads and not all(buffer.whole)
    staging = 0
    if staged:
        # pp = 1: the word table's bucket is written by the head first and the lookup last, so it
        # is open the whole backward; besides it, the bucket being written and STAGED_IN_FLIGHT
        # sent ones.
        word = [n for n, holds, whole in zip(sizes, buffer.holds_word, buffer.whole)
                if holds and not whole and pp == 1]
        others = sorted((n for n, holds, whole in zip(sizes, buffer.holds_word, buffer.whole)
                         if not whole and not (holds and pp == 1)), reverse=True)
        staging = 4 * (sum(word) + sum(others[:1 + STAGED_IN_FLIGHT]))
    # ZeRO-1/2 re-home the parameters into one flat buffer laid out (padded) like the gradients'.
    weights, gathered = (buffer.layout.numel if zero_stage in (1, 2) else params) * element_bytes, 0
    if zero_stage == 3:
        weights = sum(n // dp for n in sizes) * element_bytes
        root = sum(n for n, unit in zip(sizes, buffer.units) if unit == ROOT)
        layers = sorted((n for n, unit in zip(sizes, buffer.units) if unit != ROOT), reverse=True)
        gathered = (root + sum(layers[:2])) * element_bytes
    state_per_element = 12 if element_bytes != 4 else 8
    on_host = offload != "none"
    return ResidentState(
        parameters=params, owned=buffer.owned, weights=weights, gathered=gathered,
        gradients=4 * sum(held), staging=staging,
        optimizer=0 if on_host else state_per_element * buffer.owned,
        host=(12 + 4 + element_bytes) * buffer.owned if on_host else 0)

