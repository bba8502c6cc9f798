"""``python -m m6_engine.plan``: memory and step-time tables of M6 training layouts.

    python -m m6_engine.plan --preset paper-96xV100 [--meta]     the paper's cluster (A.1)
    python -m m6_engine.plan --preset h200-8x8                   8 nodes x 8 H200
    python -m m6_engine.plan --model m6-large --device A100-80G --tp 8 --pp 4 --dp 2 \
        --micro-batch 2 --global-batch 1024 --recompute selective --precision bf16 --zero-stage 1 \
        --sequence-parallel --virtual-stages 2
    python -m m6_engine.plan --config examples/configs/m6-large-8xH200.yaml --gpus 64 --device H200-141G
    python -m m6_engine.plan --model m6-large --device H100-80G --gpus 128 --global-batch 4096 --search

``--meta`` also builds every rank of the chosen layout's real model on the meta device and checks
the parameter counts against the plan's.
"""

import argparse
import dataclasses

from m6_engine.config import (
    OFFLOAD_MODES, RECOMPUTE_MODES, ZERO_STAGES, ConfigError, job_config_from_dict, load_yaml, model_preset,
)
from m6_engine.plan.devices import DEVICE_NAMES, GiB, device_preset
from m6_engine.plan.layout import TASK_SHAPES, Layout, SequenceLayout
from m6_engine.plan.memory import stage_parameters, unique_parameters
from m6_engine.plan.perf import CostModel
from m6_engine.plan.planner import SearchSpace, make_plan, search
from m6_engine.plan.presets import CLUSTERS, cluster_preset, plan_cluster
from m6_engine.plan.report import format_plan, format_search


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(CLUSTERS), help="a named cluster (searched)")
    p.add_argument("--config", help="a job YAML (model, parallel, train, optimizer sections)")
    p.add_argument("--model", default="m6-large", help="model preset (tiny, m6-base, m6-large)")
    p.add_argument("--device", default="H200-141G", help=f"one of {list(DEVICE_NAMES)}")
    p.add_argument("--gpus", type=int, help="world size (dp = gpus / (tp * pp))")
    for name in ("tp", "pp", "dp"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--recompute", choices=RECOMPUTE_MODES)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--zero-stage", type=int, choices=ZERO_STAGES,
                   help="ZeRO stage (OptimizerConfig.zero_stage); with --search: pins it")
    p.add_argument("--offload", choices=OFFLOAD_MODES, help="optimizer offload (OptimizerConfig.offload)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence parallelism (ParallelConfig.sequence_parallel, tp > 1)")
    p.add_argument("--virtual-stages", type=int,
                   help="model chunks per pipeline rank: interleaved 1F1B (ParallelConfig.virtual_stages)")
    p.add_argument("--task", choices=TASK_SHAPES, default="multimodal_to_text",
                   help="sample shape the model FLOPs are counted for")
    p.add_argument("--seq-length", type=int, help="padded positions (default patches + text = 528)")
    p.add_argument("--search", action="store_true", help="list the layouts of --gpus that fit")
    p.add_argument("--top", type=int, default=10, help="layouts listed by --search / --preset")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--inter-node-gbps", type=float, help="per-GPU network share, Gb/s")
    p.add_argument("--pcie-gbytes", type=float, help="per-GPU PCIe bandwidth to the host, GB/s one way")
    p.add_argument("--host-gbytes", type=float, help="per-GPU share of the host memory bandwidth, GB/s")
    p.add_argument("--host-memory-gib", type=float, help="per-GPU share of the host memory, GiB")
    p.add_argument("--compute-efficiency", type=float, default=CostModel.compute_efficiency)
    p.add_argument("--comm-efficiency", type=float, default=CostModel.comm_efficiency)
    p.add_argument("--half-rate-rows", type=int, default=CostModel.half_rate_rows,
                   help="matmul rows (micro-batch x sequence) at half the large-matmul rate")
    p.add_argument("--meta", action="store_true", help="check the chosen layout on the meta device")
    return p.parse_args(argv)


def _device(args, name):
    device = device_preset(name)
    if args.gpus_per_node:
        device = dataclasses.replace(device, gpus_per_node=args.gpus_per_node)
    if args.inter_node_gbps:
        device = dataclasses.replace(device, inter_node_bandwidth=args.inter_node_gbps * 1e9 / 8)
    if args.pcie_gbytes:
        device = dataclasses.replace(device, pcie_bandwidth=args.pcie_gbytes * 1e9)
    if args.host_gbytes:
        device = dataclasses.replace(device, host_memory_bandwidth=args.host_gbytes * 1e9)
    if args.host_memory_gib:
        device = dataclasses.replace(device, host_memory_bytes=int(args.host_memory_gib * GiB))
    return device


LAYOUT_FLAGS = ("tp", "pp", "micro_batch", "global_batch", "recompute", "precision", "zero_stage",
                "offload", "sequence_parallel", "virtual_stages")


def _explicit_layout(args, job=None) -> Layout:
    """The layout of the flags, defaulting to the job config's fields (or to 1 / none / bf16)."""
    base = dict(tp=1, pp=1, micro_batch=1, global_batch=None, recompute="none", precision="bf16")
    if job is not None:
        of_job = Layout.of_job(job, dp=1)
        base = {name: getattr(of_job, name) for name in LAYOUT_FLAGS}
    flags = {name: getattr(args, name) for name in LAYOUT_FLAGS}
    fields = {**base, **{k: v for k, v in flags.items() if v is not None}}
    tp, pp = fields["tp"], fields["pp"]
    dp = args.dp or (args.gpus // (tp * pp) if args.gpus else 1)
    if args.gpus and tp * pp * dp != args.gpus:
        raise ConfigError(f"--gpus {args.gpus} is not tp * pp * dp = {tp} * {pp} * {dp}")
    if fields["global_batch"] is None:
        fields["global_batch"] = fields["micro_batch"] * dp
    return Layout(dp=dp, **fields)


def _search_space(args) -> SearchSpace:
    """The search space with every layout flag given pinned."""
    pinned = {"recompute": args.recompute, "zero_stage": args.zero_stage, "offload": args.offload,
              "sequence_parallel": args.sequence_parallel, "virtual_stages": args.virtual_stages,
              "tp": args.tp, "pp": args.pp, "micro_batch": args.micro_batch}
    return SearchSpace(**{k: (v,) for k, v in pinned.items() if v is not None})


def _meta_check(config, layout) -> str:
    """Build every rank on the meta device; compare with the plan's parameter counts."""
    from m6_engine.parallel import initialize
    from m6_engine.plan.meta import meta_build

    state = initialize(backend="gloo")
    ranks = meta_build(config, layout.tp, layout.pp, layout.dp, state.group("tp"), layout.virtual_stages)
    lines = [f"meta-device build of each (stage, tp rank) of {layout.describe()}:"]
    wrong = [r for r in ranks if r.count != stage_parameters(config, layout.tp, layout.pp, r.pp_rank,
                                                             layout.virtual_stages)]
    for r in ranks:
        if r.tp_rank == 0:
            lines.append(f"  stage {r.pp_rank:>2} tp 0: {len(r.shapes):>4} tensors, "
                         f"{r.count:>13,} parameters")
    lines.append(f"  {len(ranks) - len(wrong)} of {len(ranks)} builds hold the plan's parameter count"
                 + "".join(f"; stage {r.pp_rank} tp {r.tp_rank} holds {r.count:,}" for r in wrong))
    total = sum(r.unique for r in ranks)
    lines.append(f"  counted once: {total:,} parameters = {total / 1e9:.3f} B "
                 f"(plan {unique_parameters(config, layout.tp, layout.pp):,})")
    lines.append("  shapes on tp rank 0 (the first block of each stage; every block is alike):")
    for r in ranks:
        if r.tp_rank:
            continue
        first = f"layers.{min(int(n.split('.')[1]) for n in r.shapes if n.startswith('layers.'))}."
        lines += [f"    stage {r.pp_rank} {name} {shape}" for name, shape in r.shapes.items()
                  if not name.startswith("layers.") or name.startswith(first)]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cost = CostModel(args.compute_efficiency, args.comm_efficiency, args.half_rate_rows)
    job = job_config_from_dict(load_yaml(args.config)) if args.config else None
    if args.preset:
        preset = cluster_preset(args.preset)
        config = model_preset(preset.model)
    else:
        config = job.model if job else model_preset(args.model)
    seq = SequenceLayout.for_task(config, args.task)
    if args.seq_length:
        seq = seq.with_length(args.seq_length)
    if args.preset:
        plans = plan_cluster(args.preset, device=_device(args, preset.device), seq=seq, cost=cost)
        print(f"preset {args.preset}: {preset.model} on {preset.world_size} x {preset.device}; {preset.note}")
        if not plans:
            raise SystemExit("no layout of this preset fits")
        print(format_plan(plans[0]))
        print(f"\nlayouts that fit, best first ({len(plans)}):\n{format_search(plans, args.top)}")
        chosen = plans[0]
    elif args.search:
        if not args.gpus or not args.global_batch:
            raise SystemExit("--search needs --gpus and --global-batch")
        plans = search(config, args.gpus, args.global_batch, args.precision or "bf16",
                       _device(args, args.device), seq, space=_search_space(args), cost=cost)
        print(format_search(plans, args.top))
        if plans:
            print("\nbest:\n" + format_plan(plans[0]))
        chosen = plans[0] if plans else None
    else:
        chosen = make_plan(config, _explicit_layout(args, job), seq, _device(args, args.device), cost)
        print(format_plan(chosen))
    if args.meta and chosen is not None:
        print("\n" + _meta_check(config, chosen.layout))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
