"""A plan: one layout's per-rank memory and step estimate; the search over layouts that fit."""

import itertools
from dataclasses import dataclass

from m6_engine.config import RECOMPUTE_MODES, ConfigError, ModelConfig
from m6_engine.plan.devices import Device
from m6_engine.plan.layout import Layout, SequenceLayout
from m6_engine.plan.memory import StageMemory, all_stages
from m6_engine.plan.perf import CostModel, StepEstimate, estimate_step


@dataclass(frozen=True)
class Plan:
    """Everything the planner says about one job."""

    config: ModelConfig
    layout: Layout
    seq: SequenceLayout
    device: Device
    stages: tuple[StageMemory, ...]
    step: StepEstimate

    @property
    def peak_bytes(self) -> int:
        """The fullest rank's total (stage 0 usually: it holds the most micro-batches)."""
        return max(stage.total for stage in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.usable_bytes


def make_plan(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
              cost: CostModel = CostModel()) -> Plan:
    """Plan ``layout``; ConfigError when the model cannot be split that way or the device lacks
    the precision."""
    layout.check(config)
    device.peak(layout.precision)
    return Plan(config, layout, seq, device, tuple(all_stages(config, layout, seq, device)),
                estimate_step(config, layout, seq, device, cost))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class SearchSpace:
    """What ``search`` may vary; a one-element tuple pins a choice."""

    recompute: tuple[str, ...] = RECOMPUTE_MODES
    optimizer_sharding: tuple[bool, ...] = (False, True)
    tp: tuple[int, ...] | None = None
    """None: every tp that divides the model and fits in a node."""
    pp: tuple[int, ...] | None = None
    """None: every pp that divides the world (1 .. num_layers)."""
    micro_batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def candidate_layouts(config: ModelConfig, world_size: int, global_batch: int, precision: str,
                      device: Device, space: SearchSpace = SearchSpace()):
    """Every layout of ``world_size`` ranks in ``space`` the model can be split into."""
    for tp, pp in itertools.product(_divisors(world_size), repeat=2):
        if world_size % (tp * pp) or tp > device.gpus_per_node or pp > config.num_layers:
            continue
        if (space.tp is not None and tp not in space.tp) or (space.pp is not None and pp not in space.pp):
            continue
        try:
            config.check_layout(tp, pp)
        except ConfigError:
            continue
        dp = world_size // (tp * pp)
        for micro_batch, recompute, sharding in itertools.product(
                space.micro_batch, space.recompute, space.optimizer_sharding):
            pointless_zero = sharding and dp == 1 and len(space.optimizer_sharding) > 1
            if global_batch % (micro_batch * dp) or pointless_zero:
                continue
            yield Layout(tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, global_batch=global_batch,
                         recompute=recompute, precision=precision, optimizer_sharding=sharding)


def search(config: ModelConfig, world_size: int, global_batch: int, precision: str, device: Device,
           seq: SequenceLayout, *, space: SearchSpace = SearchSpace(),
           cost: CostModel = CostModel()) -> list[Plan]:
    """Plans of every candidate layout that fits, best estimated step time first (ties: less
    memory)."""
    device.peak(precision)
    plans = (make_plan(config, layout, seq, device, cost)
             for layout in candidate_layouts(config, world_size, global_batch, precision, device, space))
    fitting = [plan for plan in plans if plan.fits]
    return sorted(fitting, key=lambda plan: (round(plan.step.step_s, 6), plan.peak_bytes))
