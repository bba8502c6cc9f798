"""A plan: one layout's per-rank memory and step estimate; the search over layouts that fit."""

import itertools
from dataclasses import dataclass

from m6_engine.config import OFFLOAD_MODES, RECOMPUTE_MODES, ZERO_STAGES, ConfigError, ModelConfig
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
    def host_bytes(self) -> int:
        """The most host memory a rank's offloaded optimizer needs (0 without offload)."""
        return max(stage.host for stage in self.stages)

    @property
    def fits(self) -> bool:
        """Device memory of the fullest rank fits, and so does its offloaded state on the host."""
        return (self.peak_bytes <= self.device.usable_bytes
                and self.host_bytes <= self.device.host_usable_bytes)


def make_plan(config: ModelConfig, layout: Layout, seq: SequenceLayout, device: Device,
              cost: CostModel = CostModel()) -> Plan:
    """Plan ``layout``; ConfigError when the model cannot be split that way or the device lacks
    the precision."""
    layout.check(config, seq)
    device.peak(layout.precision)
    return Plan(config, layout, seq, device, tuple(all_stages(config, layout, seq, device)),
                estimate_step(config, layout, seq, device, cost))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class SearchSpace:
    """What ``search`` may vary; a one-element tuple pins a choice."""

    recompute: tuple[str, ...] = RECOMPUTE_MODES
    zero_stage: tuple[int, ...] = ZERO_STAGES
    offload: tuple[str, ...] = OFFLOAD_MODES
    """"cpu" is tried with ZeRO 0-2 only (the engine refuses it with stage 3)."""
    sequence_parallel: tuple[bool, ...] = (False, True)
    """True is tried where tp > 1 and tp divides the sequence."""
    virtual_stages: tuple[int, ...] = (1, 2, 4)
    """V > 1 is tried where pp > 1, pp divides the micro-batches and pp V <= num_layers."""
    tp: tuple[int, ...] | None = None
    """None: every tp that divides the model and fits in a node."""
    pp: tuple[int, ...] | None = None
    """None: every pp that divides the world (1 .. num_layers)."""
    micro_batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    num_microbatches: tuple[int, ...] | None = None
    """Micro-batches per replica per step (gradient accumulation) to allow: None, any that
    ``micro_batch`` gives; pinned (the paper's 8 for M6-large), the micro-batch follows from it,
    global_batch / (dp * m), and ``micro_batch`` is not used."""

    def micro_batches(self, global_batch: int, dp: int) -> list[int]:
        """The micro-batch sizes to try at ``dp`` replicas."""
        if self.num_microbatches is None:
            return [b for b in self.micro_batch if global_batch % (b * dp) == 0]
        return [global_batch // (dp * m) for m in self.num_microbatches if global_batch % (dp * m) == 0]


def _mesh_options(config: ModelConfig, seq: SequenceLayout, tp: int, pp: int, dp: int, micro_batch: int,
                  global_batch: int, space: SearchSpace):
    """(sequence_parallel, virtual_stages, zero_stage, offload) worth trying at this mesh: SP only
    with tp > 1, V > 1 only where interleaving can run, ZeRO > 0 only with dp > 1 unless pinned."""
    m = global_batch // (micro_batch * dp)
    sps = [sp for sp in space.sequence_parallel if not sp or (tp > 1 and seq.seq_length % tp == 0)]
    vs = [v for v in space.virtual_stages
          if v == 1 or (pp > 1 and m % pp == 0 and pp * v <= config.num_layers)]
    zeros = [0] if dp == 1 and 0 in space.zero_stage else list(space.zero_stage)
    for sp, v, zero, offload in itertools.product(sps, vs, zeros, space.offload):
        if offload == "none" or zero != 3:
            yield sp, v, zero, offload


def candidate_layouts(config: ModelConfig, world_size: int, global_batch: int, precision: str,
                      device: Device, space: SearchSpace = SearchSpace(), seq: SequenceLayout | None = None):
    """Every layout of ``world_size`` ranks in ``space`` the model (and ``seq``) can be split into."""
    seq = seq or SequenceLayout.for_task(config)
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
        for micro_batch, recompute in itertools.product(space.micro_batches(global_batch, dp), space.recompute):
            for sp, v, zero, offload in _mesh_options(config, seq, tp, pp, dp, micro_batch, global_batch,
                                                      space):
                yield Layout(tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, global_batch=global_batch,
                             recompute=recompute, precision=precision, sequence_parallel=sp,
                             virtual_stages=v, zero_stage=zero, offload=offload)


def search(config: ModelConfig, world_size: int, global_batch: int, precision: str, device: Device,
           seq: SequenceLayout, *, space: SearchSpace = SearchSpace(),
           cost: CostModel = CostModel()) -> list[Plan]:
    """Plans of every candidate layout that fits, best estimated step time first (ties: less
    memory)."""
    device.peak(precision)
    plans = (make_plan(config, layout, seq, device, cost)
             for layout in candidate_layouts(config, world_size, global_batch, precision, device, space, seq))
    fitting = [plan for plan in plans if plan.fits]
    return sorted(fitting, key=lambda plan: (round(plan.step.step_s, 6), plan.peak_bytes))
