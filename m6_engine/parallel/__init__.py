"""Megatron-style parallelism on ``torch.distributed``: tensor, pipeline and data parallel.

Build one :class:`ParallelState` with :func:`initialize` and pass it to what communicates:
tensor-parallel layers (``layers``, ``mappings``, ``cross_entropy``), RNG streams and activation
checkpointing (``random``), pipeline transfers and schedules (``p2p``, ``schedules``, ``interleaved``), tied
first/last-stage weights (``tied``), data-parallel gradient buckets (``data_parallel``) and who
finishes a step's gradient reduction (``grad_sync``).
"""

from m6_engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from m6_engine.parallel.data_parallel import (
    Bucket, BufferLayout, DataParallel, data_parallel_options, grad_reduce_for, layout_grad_buffer,
)
from m6_engine.parallel.sharded_params import ShardedParameters, layer_units
from m6_engine.parallel.grad_sync import finalize_model_grads, model_grad_sync
from m6_engine.parallel.init import (
    InitMethod, NormalInit, init_generator, master_weight, mt19937_normal_init, normal_init,
)
from m6_engine.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from m6_engine.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from m6_engine.parallel.interleaved import forward_backward_interleaved, schedule_table
from m6_engine.parallel.p2p import P2PShapeError, PipeChannel, TensorSpec
from m6_engine.parallel.random import MODEL_PARALLEL_STREAM, RNGTracker, checkpoint, seed_parallel_rng
from m6_engine.parallel.schedules import (
    SCHEDULES, ScheduleTimers, StepResult, forward_backward, forward_backward_1f1b,
    forward_backward_gpipe, forward_backward_no_pipelining,
)
from m6_engine.parallel.state import (
    AXES, GROUP_NAMES, LayoutError, ParallelState, RankLayout, initialize, rank_layout,
)
from m6_engine.parallel.tied import allreduce_tied_grads, broadcast_tied_weights, mark_tied, tied_parameters

__all__ = [
    "AXES", "Bucket", "BufferLayout", "ColumnParallelLinear", "DataParallel", "GROUP_NAMES",
    "InitMethod", "LayoutError", "NormalInit", "MODEL_PARALLEL_STREAM", "P2PShapeError", "ParallelState",
    "PipeChannel", "RNGTracker", "RankLayout", "RowParallelLinear", "SCHEDULES", "ScheduleTimers",
    "StepResult", "TensorSpec", "VocabParallelEmbedding", "allreduce_tied_grads",
    "broadcast_tied_weights", "checkpoint", "copy_to_tp", "forward_backward",
    "finalize_model_grads", "forward_backward_1f1b", "forward_backward_gpipe",
    "forward_backward_interleaved", "forward_backward_no_pipelining", "model_grad_sync", "schedule_table",
    "ShardedParameters", "data_parallel_options", "gather_from_tp", "grad_reduce_for",
    "init_generator", "initialize", "layer_units", "layout_grad_buffer", "mark_tied",
    "master_weight", "mt19937_normal_init", "normal_init", "rank_layout", "reduce_from_tp", "scatter_to_tp",
    "seed_parallel_rng", "tied_parameters", "vocab_parallel_cross_entropy",
]
