"""Named clusters: the paper's (appendix A.1) and a current one, planned by search.

``paper-96xV100``: M6-large on 96 V100-32G with what the paper used (section 5): fp16 O2, activation
checkpointing (``full``), ZeRO-1 optimizer sharding (no offload) and pipeline parallelism
(pp > 1), global batch 6144 with gradient accumulation 8 (appendix A: 8 micro-batches per replica
per step, so the micro-batch is 6144 / (8 dp)). The paper does not give its tp / pp / dp split, nor how its pipeline
was scheduled, so the planner picks the fastest that fits, sequence parallelism and interleaved
1F1B included (they change how the layout runs, not what the paper trained with).
``h200-8x8``: the same model, batch and accumulation on 8 nodes of 8 H200, bf16, every other
choice searched (ZeRO 0-3, optimizer offload, sequence parallelism, interleaving).
"""

from dataclasses import dataclass

from m6_engine.config import ConfigError, ModelConfig, model_preset
from m6_engine.plan.devices import Device, device_preset
from m6_engine.plan.layout import SequenceLayout
from m6_engine.plan.planner import Plan, SearchSpace, search
from m6_engine.plan.perf import CostModel


@dataclass(frozen=True)
class ClusterPreset:
    """A model on a cluster with some training choices pinned and the rest searched."""

    model: str
    device: str
    world_size: int
    precision: str
    global_batch: int
    space: SearchSpace
    note: str


PAPER_ACCUMULATION = (8,)
"""Appendix A: "the batch size set for M6-large is 6144 with gradient accumulation set to 8"."""

PAPER_PIPELINE_STAGES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
"""pp > 1 dividing 96 (and at most 50 layers)."""

CLUSTERS = {
    "paper-96xV100": ClusterPreset(
        model="m6-large", device="V100-32G", world_size=96, precision="fp16", global_batch=6144,
        space=SearchSpace(recompute=("full",), zero_stage=(1,), offload=("none",), pp=PAPER_PIPELINE_STAGES,
                          num_microbatches=PAPER_ACCUMULATION),
        note="paper 5 / A.1: fp16 O2, activation checkpointing, ZeRO-1, pipeline, batch 6144"),
    "h200-8x8": ClusterPreset(
        model="m6-large", device="H200-141G", world_size=64, precision="bf16", global_batch=6144,
        space=SearchSpace(num_microbatches=PAPER_ACCUMULATION),
        note="8 nodes x 8 H200, bf16, accumulation 8 (the paper's), everything else searched"),
}


def cluster_preset(name: str) -> ClusterPreset:
    if name not in CLUSTERS:
        raise ConfigError(f"unknown cluster preset {name!r}; choose one of {sorted(CLUSTERS)}")
    return CLUSTERS[name]


def plan_cluster(name: str, *, device: Device | None = None, seq: SequenceLayout | None = None,
                 cost: CostModel = CostModel(), config: ModelConfig | None = None) -> list[Plan]:
    """Fitting plans of a named cluster, best first (the first is the preset's layout)."""
    preset = cluster_preset(name)
    config = config or model_preset(preset.model)
    device = device or device_preset(preset.device)
    seq = seq or SequenceLayout.for_task(config)
    return search(config, preset.world_size, preset.global_batch, preset.precision, device, seq,
                  space=preset.space, cost=cost)
