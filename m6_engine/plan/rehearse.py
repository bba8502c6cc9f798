"""Rehearse a plan on this machine: real layers of a big model, trained, measured, checkpointed.

The 10B M6-large cannot train on a CPU, but a slice of it can: its first ``num_layers`` blocks
(d 4096, 128 heads, FFN 16384) with the full embedding, patch projection and head, on a real
sequence of 16 + 512 = 528 positions. :func:`rehearse` runs that slice with the real trainer
(``m6_engine.training.Trainer``: AdamW O2 step, fp32 gradient buffers, recomputation, tensor
parallelism) for a few steps on one rank of the job, and reports per step the loss and time, and
per rank the measured memory against ``plan.memory.stage_memory`` for the very same layout:

- resident: weights as stored, fp32 gradient buffer, optimizer state
  (``plan.measure.resident_bytes``; ZeRO-3 stores parameter shards);
- transient state inside a step: ZeRO-2/3's full-size gradient staging
  (``DataParallel.peak_staging_numel``) and ZeRO-3's gathered parameters
  (``ShardedParameters.peak_gathered_numel``), each its peak over the steps;
- activations: the saved-for-backward bytes alive after each forward of the stage, or of each of
  its chunks with interleaved 1F1B (``plan.measure.SavedActivations``), against two predictions:
  the planned figure (the longest sample, ``SequenceLayout.max_loss_tokens`` loss tokens) and the
  formula evaluated at the sequence length and loss tokens the measured micro-batches really had
  (what the tests hold to 10%);
- ``measured_total``: the sum of those measured terms (each at its own peak, so an upper bound on
  what they hold at once) against ``predicted_total``, the plan's same terms at the measured
  sample (``StageMemory.measured_terms``: everything but the temporaries, which no CPU
  measurement sees: there is no allocator peak on the CPU);
- the process's peak resident set size, a sanity figure only (allocator, libraries and the
  interpreter are in it; the planner's terms are not).

It then saves the sharded checkpoint (``m6_engine.checkpoint``), overwrites every weight, loads
the checkpoint back and checks each weight equals what was saved.

``python -m torch.distributed.run --nproc_per_node=2 -m m6_engine.plan.rehearse --data DIR``
(``examples/rehearse_10b.sh``); DIR is the folder ``python -m m6_engine.data.prepare_demo`` wrote.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time

import torch

from m6_engine.config import JobConfig, job_config_from_dict
from m6_engine.metrics import losses_of
from m6_engine.parallel import ParallelState
from m6_engine.plan.devices import cpu_device
from m6_engine.plan.layout import Layout, SequenceLayout
from m6_engine.plan.measure import SavedActivations, resident_bytes
from m6_engine.plan.memory import held_activations, microbatch_activations, stage_memory

MiB = 2 ** 20
RESIDENT_PARTS = ("weights", "gradients", "optimizer")
TRANSIENT_PARTS = ("staging", "gathered")


def rehearsal_job(corpus: str, vocab_file: str = "", *, model: dict | None = None, tp: int = 2,
                  steps: int = 3, lr: float = 2e-5, timeout_s: float = 600.0, parallel: dict | None = None,
                  optimizer: dict | None = None, train: dict | None = None) -> JobConfig:
    """M6-large cut to 2 layers (``model`` overrides any field), tp-way, fp32, full recomputation,
    one micro-batch of one sample per step, AdamW at ``lr`` after one warm-up step; ``parallel``,
    ``optimizer`` and ``train`` override fields of their sections (e.g. pp, virtual_stages,
    zero_stage, global_batch)."""
    return job_config_from_dict({
        "model": {"preset": "m6-large", "num_layers": 2, **(model or {})},
        "parallel": {"tp": tp, "pp": 1, "timeout_s": timeout_s, **(parallel or {})},
        "optimizer": {"lr": lr, "min_lr": lr / 10, "warmup_fraction": 1 / steps, "precision": "fp32",
                      **(optimizer or {})},
        # peak_tflops given: no matmul measurement at start-up (MFU is not what is rehearsed).
        "train": {"train_steps": steps, "micro_batch": 1, "global_batch": 1, "recompute": "full",
                  "log_interval": 1, "peak_tflops": 1.0, **(train or {})},
        "data": {"corpus": corpus, "vocab_file": vocab_file, "exhausted": "wrap"},
    })


def plan_layout(job: JobConfig, state: ParallelState) -> Layout:
    """The planner's description of ``job`` running on ``state``'s mesh."""
    return Layout.of_job(job, state.dp_size)


def forward_modules(stage: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The modules the schedule runs forwards of: the stage, or the chunks of a ``StageChunks``
    (interleaved 1F1B runs those; the stage itself never runs)."""
    return tuple(getattr(stage, "chunks", (stage,)))


@contextlib.contextmanager
def metered_forwards(modules, meter: SavedActivations):
    """Run every forward of each of ``modules`` (a module or a sequence of them) under
    ``meter.hooks()``; yields a list that receives, per forward, (saved bytes alive after it,
    sequence length, loss tokens of its batch)."""
    modules = (modules,) if isinstance(modules, torch.nn.Module) else tuple(modules)
    records, open_hooks = [], []

    def before(_module, args):
        batch = args[0]
        open_hooks.append((meter.hooks(), batch.seq_length, int(batch.loss_mask.ne(0).sum())))
        open_hooks[-1][0].__enter__()

    def after(_module, _args, _output):
        hooks, seq_length, loss_tokens = open_hooks.pop()
        hooks.__exit__(None, None, None)
        records.append((meter.live, seq_length, loss_tokens))

    handles = [handle for module in modules for handle in (
        module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True))]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def _check_reload(trainer, state: ParallelState, ckpt_dir: str) -> dict:
    """Save, overwrite every weight, load back: per-weight equality with what was saved."""
    from m6_engine.checkpoint import load_checkpoint, save_checkpoint

    saved = {name: p.detach().clone() for name, p in trainer.stage.named_parameters()}
    start = time.perf_counter()
    path = save_checkpoint(ckpt_dir, trainer.step, model=trainer.model, state=state,
                           optimizer=trainer.optimizer, rng_tracker=trainer.tracker,
                           config=trainer.job.to_dict(), extra={"step": trainer.step})
    save_s = time.perf_counter() - start
    with torch.no_grad():
        for p in trainer.stage.parameters():
            p.fill_(float("nan"))
    start = time.perf_counter()
    load_checkpoint(path, model=trainer.model, state=state, optimizer=trainer.optimizer,
                    rng_tracker=trainer.tracker)
    load_s = time.perf_counter() - start
    differing = [name for name, p in trainer.stage.named_parameters() if not torch.equal(p, saved[name])]
    return {"path": str(path), "save_s": save_s, "load_s": load_s, "weights": len(saved),
            "differing_weights": differing}


def rehearse(job: JobConfig, state: ParallelState, ckpt_dir: str, *, check_reload: bool = True) -> dict:
    """Rank function: train ``job`` (module docstring), measure against the plan, save and reload.

    Returns this rank's figures: "steps" [{step, loss, seconds}], "resident" and "transient"
    {part: (measured, predicted)}, "activations" {measured, predicted_exact, planned},
    "measured_total", "predicted_total", "temporaries_planned", "peak_rss", "rss_before",
    "planned_total", "checkpoint" (None without ``check_reload``).
    """
    from m6_engine.training import Trainer, make_datasets

    rss_before = _peak_rss_bytes()
    train_data, _ = make_datasets(job, state)
    trainer = Trainer(job, state, train_data, log_rank_output=False)
    meter = SavedActivations(trainer.stage)
    steps = []
    with metered_forwards(forward_modules(trainer.stage), meter) as forwards:
        while trainer.step < job.train.train_steps:
            report = trainer.train_step()
            steps.append({"step": trainer.step, "loss": losses_of(report.loss_parts)["loss"],
                          "seconds": report.seconds})
    peak_rss = _peak_rss_bytes()

    layout, device = plan_layout(job, state), cpu_device(peak_fp32_flops=1e11)
    seq = SequenceLayout.for_task(job.model)
    plan = stage_memory(job.model, layout, seq, device, state.pp_rank)
    measured = resident_bytes(trainer.model, trainer.model.grad_buffer, trainer.optimizer)
    transient = _transient_bytes(trainer.model)
    live, seq_length, loss_tokens = max(forwards)
    _, exact = held_activations(layout, state.pp_rank, microbatch_activations(
        job.model, layout, seq.with_length(seq_length), device, state.pp_rank, loss_tokens=loss_tokens,
        tp_rank=state.tp_rank))
    measured_total = sum(measured.values()) + sum(transient.values()) + live
    predicted_total = dataclasses.replace(plan, activations=exact).measured_terms
    return {"rank": state.rank, "tp_rank": state.tp_rank, "layout": layout.describe(),
            "parameters": plan.parameters, "steps": steps,
            "resident": {part: (measured[part], getattr(plan, part)) for part in RESIDENT_PARTS},
            "transient": {part: (transient[part], getattr(plan, part)) for part in TRANSIENT_PARTS},
            "activations": {"measured": live, "predicted_exact": exact, "planned": plan.activations,
                            "seq_length": seq_length, "loss_tokens": loss_tokens,
                            "planned_loss_tokens": seq.max_loss_tokens,
                            "left_after_steps": meter.live},
            "measured_total": measured_total, "predicted_total": predicted_total,
            "temporaries_planned": plan.temporaries, "planned_total": plan.total,
            "rss_before": rss_before, "peak_rss": peak_rss,
            "checkpoint": _check_reload(trainer, state, ckpt_dir) if check_reload else None}


def _transient_bytes(model) -> dict[str, int]:
    """The peaks of the state ZeRO-2/3 hold only inside a step: full-size gradient staging and
    ZeRO-3's gathered parameters."""
    sharded = model.sharded_params
    element = model.params[0].element_size()
    return {"staging": 4 * model.peak_staging_numel,
            "gathered": 0 if sharded is None else sharded.peak_gathered_numel * element}


def _mib(n: int) -> str:
    return f"{n / MiB:10.1f} MiB"


def _relative(measured: int, predicted: int) -> str:
    return f"({(predicted - measured) / measured:+.2%})" if measured else "(none measured)"


def format_report(results: list[dict]) -> str:
    """The rehearsal's figures as text: losses and step times, then memory per rank."""
    first = results[0]
    lines = [f"layout: {first['layout']}; {first['parameters']:,} parameters per rank",
             "step   loss       seconds (rank 0)"]
    lines += [f"{s['step']:4d}   {s['loss']:.4f}   {s['seconds']:8.1f}" for s in first["steps"]]
    for r in results:
        a = r["activations"]
        lines.append(f"-- rank {r['rank']} (tp rank {r['tp_rank']}): measured vs predicted")
        for part, (measured, predicted) in [*r["resident"].items(), *r["transient"].items()]:
            if measured or predicted:
                lines.append(f"  {part:<12} {_mib(measured)} {_mib(predicted)}  {_relative(measured, predicted)}")
        lines.append(f"  {'activations':<12} {_mib(a['measured'])} {_mib(a['predicted_exact'])}  "
                     f"{_relative(a['measured'], a['predicted_exact'])} "
                     f"({a['loss_tokens']} loss tokens of {a['seq_length']} positions)")
        lines.append(f"  {'total':<12} {_mib(r['measured_total'])} {_mib(r['predicted_total'])}  "
                     f"{_relative(r['measured_total'], r['predicted_total'])} (each term at its peak; "
                     "temporaries not measured)")
        lines.append(f"  planned activations (longest sample, {a['planned_loss_tokens']} loss tokens) "
                     f"{_mib(a['planned'])}; planned temporaries {_mib(r['temporaries_planned'])}")
        lines.append(f"  planned total {_mib(r['planned_total'])}; process peak RSS {_mib(r['peak_rss'])} "
                     f"(before the model: {_mib(r['rss_before'])})")
        c = r["checkpoint"]
        if c is not None:
            lines.append(f"  checkpoint: saved in {c['save_s']:.1f} s, loaded in {c['load_s']:.1f} s, "
                         f"{c['weights'] - len(c['differing_weights'])}/{c['weights']} weights equal")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Entry point under torchrun (module docstring)."""
    import torch.distributed as dist

    from m6_engine.parallel import initialize

    parser = argparse.ArgumentParser(description="rehearse 10B-shaped M6 layers on CPU ranks")
    parser.add_argument("--data", required=True, help="folder written by m6_engine.data.prepare_demo")
    parser.add_argument("--vocab-file", default="", help="default: the installed bert-base-chinese")
    parser.add_argument("--ckpt-dir", default="", help="default: a temporary folder, removed after")
    parser.add_argument("--json", default="", help="also write every rank's figures here")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-5,
                        help="Adam moves every weight by about lr on its first step; 1e-4 overshoots at d 4096")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--num-heads", type=int, default=128)
    parser.add_argument("--max-text-positions", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
             "num_heads": args.num_heads, "max_text_positions": args.max_text_positions}
    job = rehearsal_job(os.path.join(args.data, "corpus", "train"), args.vocab_file, model=model,
                        steps=args.steps, lr=args.lr)
    state = initialize(job.parallel.tp, job.parallel.pp, backend="gloo", timeout=job.parallel.timeout_s)
    # Every rank must write into the same folder: rank 0 names the temporary one and removes it.
    folder = [args.ckpt_dir or (tempfile.mkdtemp(prefix="rehearse_") if state.rank == 0 else None)]
    dist.broadcast_object_list(folder, src=0)
    try:
        mine = rehearse(job, state, folder[0])
        gathered = [None] * state.world_size
        dist.all_gather_object(gathered, mine)
    finally:
        if not args.ckpt_dir and state.rank == 0:
            shutil.rmtree(folder[0], ignore_errors=True)
    if state.rank == 0:
        print(format_report(gathered), flush=True)
        if args.json:
            with open(args.json + ".tmp", "w", encoding="utf-8") as f:
                json.dump(gathered, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
