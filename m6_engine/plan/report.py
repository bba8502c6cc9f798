"""Plain-text tables of plans (what ``python -m m6_engine.plan`` prints)."""

from m6_engine.plan.devices import GiB
from m6_engine.plan.memory import unique_parameters
from m6_engine.plan.planner import Plan


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _time(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _layers(stage) -> str:
    return ",".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in stage.layers)


STAGE_COLUMNS = (("stage", 5), ("layers", 7), ("params", 9), ("weights", 8), ("gather", 6), ("grads", 6),
                 ("stagng", 6), ("optim", 6), ("mb", 3), ("activ", 6), ("temp", 5), ("total", 6),
                 ("host", 6))


def _stage_rows(plan: Plan) -> list[str]:
    usable = plan.device.usable_bytes
    stages = plan.stages
    shown = stages if len(stages) <= 12 else stages[:6] + stages[-3:]
    layer_width = max(7, *(len(_layers(s)) for s in shown))
    widths = [layer_width if name == "layers" else width for name, width in STAGE_COLUMNS]
    rows = ["  " + " ".join(f"{name:>{w}}" for (name, _), w in zip(STAGE_COLUMNS, widths))
            + f"  of {_gib(usable)} GiB usable"]
    for i, s in enumerate(shown):
        if len(stages) > 12 and i == 6:
            rows.append(f"  {'...':>5}")
        flag = "" if s.total <= usable else "  DOES NOT FIT"
        cells = (s.stage_id, _layers(s), f"{s.parameters / 1e6:.1f}M", _gib(s.weights), _gib(s.gathered),
                 _gib(s.gradients), _gib(s.staging), _gib(s.optimizer), s.in_flight, _gib(s.activations),
                 _gib(s.temporaries), _gib(s.total), _gib(s.host))
        rows.append("  " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + flag)
    return rows


def _fits_line(plan: Plan) -> str:
    dev = plan.device
    line = (f"  fits: {'yes' if plan.fits else 'NO'} (fullest rank {_gib(plan.peak_bytes)} GiB of "
            f"{_gib(dev.usable_bytes)} usable, {_gib(dev.memory_bytes)} on the device")
    if plan.host_bytes:
        line += (f"; offloaded optimizer {_gib(plan.host_bytes)} GiB of host memory per rank, of "
                 f"{_gib(dev.host_usable_bytes)} usable")
    return line + ")"


def format_plan(plan: Plan) -> str:
    """The plan's per-rank memory table and per-step estimate."""
    c, lay, dev, st = plan.config, plan.layout, plan.device, plan.step
    params = unique_parameters(c, lay.tp, lay.pp)
    optimizer = "offloaded: PCIe both ways + host AdamW" if lay.offload != "none" else "on the device"
    pcie = f", PCIe {st.pcie_bytes / 1e9:.2f} GB" if st.pcie_bytes else ""
    lines = [
        f"model    {c.num_layers} layers, d {c.hidden_size}, {c.num_heads} heads, ffn {c.ffn_size}, "
        f"vocab {c.vocab_size} (padded {c.padded_vocab_size(lay.tp)}): {params / 1e9:.3f} B parameters",
        f"cluster  {lay.world_size} x {dev.name} ({dev.gpus_per_node} per node), {lay.precision} peak "
        f"{dev.peak(lay.precision) / 1e12:.1f} TFLOP/s per device",
        f"layout   {lay.describe()}",
        f"sequence {plan.seq.describe()}",
        "memory per rank (GiB; tp rank 0 of each stage; gather = ZeRO-3 parameters gathered in a step, "
        "stagng = ZeRO-2/3 gradient staging; mb = micro-batch forwards in flight, of chunks with V > 1; "
        "host = offloaded optimizer, not in total):",
        *_stage_rows(plan),
        _fits_line(plan),
        "per step:",
        f"  model FLOPs      {st.model_flops:.3e} (3 x {lay.global_batch} samples, prefix mask counted); "
        f"executed {st.executed_flops:.3e} (padding, recompute)",
        f"  pipeline bubble  (pp - 1) / (V m + pp - 1) = {100 * st.bubble_fraction:.1f}%",
        f"  comm per rank    tp {st.tp_bytes / 1e9:.1f} GB, pp {st.pp_bytes / 1e9:.2f} GB, "
        f"dp {st.dp_bytes / 1e9:.2f} GB{pcie}",
        f"  time (estimate)  compute {_time(st.compute_s)}, 1F1B with tp/pp comm {_time(st.pipeline_s)}, "
        f"dp exposed {_time(st.dp_exposed_s)}, optimizer {_time(st.optimizer_s)} ({optimizer})",
        f"  step             {_time(st.step_s)}  ->  {st.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * st.mfu:.1f}%",
    ]
    return "\n".join(lines)


def format_search(plans: list[Plan], limit: int = 10) -> str:
    """One line per fitting layout, best first."""
    if not plans:
        return "no layout fits"
    head = (f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>4} {'mb':>3} {'m':>4} {'V':>2} {'SP':>3} {'recompute':>9} "
            f"{'zero':>4} {'offload':>7} {'peak GiB':>8} {'host GiB':>8} {'step':>9} {'MFU':>6} {'bubble':>6}")
    rows = [head]
    for i, p in enumerate(plans[:limit], 1):
        lay = p.layout
        rows.append(f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch:>3} "
                    f"{lay.num_microbatches:>4} {lay.virtual_stages:>2} {'on' if lay.sequence_parallel else 'off':>3} "
                    f"{lay.recompute:>9} {lay.zero_stage:>4} {lay.offload:>7} "
                    f"{_gib(p.peak_bytes):>8} {_gib(p.host_bytes):>8} {_time(p.step.step_s):>9} "
                    f"{100 * p.step.mfu:>5.1f}% {100 * p.step.bubble_fraction:>5.1f}%")
    if len(plans) > limit:
        rows.append(f"    ... {len(plans) - limit} more layouts fit")
    return "\n".join(rows)
