"""The planner: parameters, memory and FLOPs of any M6 config on any cluster layout.

``make_plan(config, layout, seq, device)`` gives one layout's per-rank memory (``memory``) and
step estimate (``perf``); ``search`` lists the layouts of a GPU count that fit, best first;
``presets`` names the paper's cluster and a current one; ``resident`` models parameters,
gradients and optimizer state per ZeRO stage (and offload to the host); ``meta`` builds every
rank's real model on the meta device; ``measure`` counts the same quantities on a live job (saved
activations, resident state, bytes per collective). ``python -m m6_engine.plan --help`` prints
the tables.
"""

from m6_engine.plan.devices import DEVICE_NAMES, GPU_DEVICES, Device, cpu_device, device_preset
from m6_engine.plan.layout import Layout, SequenceLayout
from m6_engine.plan.memory import (
    ActivationDtype, StageMemory, StageParameters, block_activation_bytes, embedding_activation_bytes,
    head_activation_bytes, held_activations, in_flight_microbatches, interleaved_in_flight,
    microbatch_activations, stage_activation_bytes, stage_memory, stage_parameter_split, stage_parameters,
    unique_parameters,
)
from m6_engine.plan.resident import ResidentState, resident_state, stage_buffer
from m6_engine.plan.perf import CostModel, StepEstimate, estimate_step, model_flops_per_step
from m6_engine.plan.planner import Plan, SearchSpace, make_plan, search
from m6_engine.plan.presets import CLUSTERS, cluster_preset, plan_cluster
from m6_engine.plan.report import format_plan, format_search

__all__ = [
    "ActivationDtype", "CLUSTERS", "CostModel", "DEVICE_NAMES", "Device", "GPU_DEVICES", "Layout", "Plan",
    "SearchSpace", "SequenceLayout", "StageMemory", "StageParameters", "StepEstimate",
    "block_activation_bytes", "cluster_preset", "cpu_device", "device_preset",
    "embedding_activation_bytes", "estimate_step", "format_plan", "format_search",
    "head_activation_bytes", "held_activations", "in_flight_microbatches", "interleaved_in_flight",
    "make_plan", "microbatch_activations", "model_flops_per_step", "ResidentState", "resident_state",
    "stage_buffer",
    "plan_cluster", "search", "stage_activation_bytes", "stage_memory", "stage_parameter_split",
    "stage_parameters", "unique_parameters",
]
