"""The training loop's save stall with asynchronous vs synchronous checkpoints (figures, not pass/fail).

What is saved is what a trainer rank saves: one M6 stage (hidden 2048, vocab 1024, the layers that
make the parameter count asked) wrapped in DataParallel, its MixedPrecisionOptimizer after one
AdamW step on synthetic gradients, fp32 on one CPU rank (gloo): 16 bytes per parameter on disk
(the weight, and the optimizer's master, exp_avg and exp_avg_sq). A 1B-parameter stage is asked
for; where the host's available memory cannot hold it, fewer parameters (the JSON says how many
and why): the run holds the live state (weights, gradient buffer, moments: 16 bytes per parameter)
plus the save's copies (16 more: the host snapshot, or the synchronous save's optimizer buffers
and DCP's transient copies), and takes at most ``MEMORY_FRACTION`` of MemAvailable. No full
trainer step runs (a forward and backward of 1B parameters on two cores adds nothing to the save);
the step timed beside the save is the optimizer step.

Per round, in one process (the order alternates so neither mode always meets the cache first):

- sync: seconds ``save_checkpoint`` holds the step: the whole write (serialise, crc32 while
  writing, fsync) and the publication;
- async: seconds ``AsyncCheckpointer.save`` holds the step (copying the state into host buffers:
  allocated by the first save, reused after), then one optimizer step timed while the write runs,
  then ``wait()``: the background write's own seconds and the seconds from the save's start to
  the checkpoint's publication;
- an optimizer step with no write in flight, for comparison.

``stall_ratio`` is sync stall / async stall of the last round (staging buffers reused); the first
round's is reported too. ``bytes`` are each checkpoint's files on disk.

Usage: ``python -m tests.bench.bench_async_checkpoint [--out DIR] [--params N] [--quick]`` (writes
``DIR/bench_async_checkpoint.json``), or ``run(out_dir)``; ``quick=True`` is a seconds-long
version for tests.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.common import print_table, write_json
from tests.distributed import run_ranks

PARAMS = 1_000_000_000
QUICK_PARAMS = 2_000_000
HIDDEN, QUICK_HIDDEN = 2048, 128
BYTES_PER_PARAM_HELD = 32
"""Live state (weight, gradient buffer, two moments) and the save's copies, fp32."""
MEMORY_FRACTION = 0.35
"""Of MemAvailable: the machine is shared, and the page cache holds the files being written."""
ROUNDS = 2


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _model_config(params: int, hidden: int):
    from m6_engine.config import ModelConfig

    per_layer = 12 * hidden * hidden + 13 * hidden   # attention 4 h^2, MLP 8 h^2, biases, norms
    layers = max(1, round(params / per_layer))
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=max(1, hidden // 128),
                       vocab_size=1024, vocab_multiple=128, max_text_positions=64, num_patches=16,
                       patch_feature_dim=64, hidden_dropout=0.0, attention_dropout=0.0)


def _optimizer_step(model, optimizer) -> float:
    """One optimizer step on synthetic gradients (what the step that follows a save changes)."""
    import torch

    from m6_engine.parallel.roles import param_role

    start = time.perf_counter()
    optimizer.zero_grad()
    with torch.no_grad():
        for p in model.params:
            param_role(p).main_grad.copy_(p).mul_(1e-3)
    optimizer.step()
    return time.perf_counter() - start


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _rank(params: int, hidden: int, ckpt_root: str, rounds: int) -> dict:
    from m6_engine.checkpoint import AsyncCheckpointer, save_checkpoint
    from m6_engine.model.m6 import M6Model
    from m6_engine.optim import MixedPrecisionOptimizer, OptimizerConfig
    from m6_engine.parallel import DataParallel
    from tests.distributed import init_state

    state = init_state()
    config = _model_config(params, hidden)
    stage = M6Model(config, state, seed=1)
    model = DataParallel(stage, state)
    optimizer = MixedPrecisionOptimizer(model, OptimizerConfig(lr=1e-4, warmup_fraction=0.0), state,
                                        total_steps=100)
    _optimizer_step(model, optimizer)          # Adam's moments exist, as in a trainer's checkpoint
    checkpointer = AsyncCheckpointer(state.device, timeout_s=3600)
    root = Path(ckpt_root)
    rows, step = [], 0
    for index in range(rounds):
        row = {"round": index + 1}
        order = ("sync", "async") if index % 2 == 0 else ("async", "sync")
        for mode in order:
            step += 1
            start = time.perf_counter()
            if mode == "sync":
                save_checkpoint(root / "sync", step, model=model, optimizer=optimizer, state=state, keep_last=1)
                row["sync_stall_s"] = time.perf_counter() - start
                row["sync_bytes"] = _folder_bytes(root / "sync" / f"step_{step:06d}")
            else:
                path = checkpointer.save(root / "async", step, model=model, optimizer=optimizer, state=state,
                                         keep_last=1)
                row["async_stall_s"] = time.perf_counter() - start
                row["step_during_write_s"] = _optimizer_step(model, optimizer)
                committed = checkpointer.wait()
                row["async_publish_s"] = time.perf_counter() - start
                row["async_write_s"] = committed.write_seconds
                row["async_bytes"] = _folder_bytes(path)
        row["step_s"] = _optimizer_step(model, optimizer)
        rows.append(row)
    staging_bytes = checkpointer.staging.nbytes
    checkpointer.close()
    return {"params": sum(p.numel() for p in stage.parameters()), "layers": config.num_layers,
            "hidden": config.hidden_size, "staging_bytes": staging_bytes, "rounds": rows}


def run(out_dir: str, quick: bool = False, params: int | None = None, ckpt_dir: str | None = None) -> dict:
    requested = params or (QUICK_PARAMS if quick else PARAMS)
    affordable = int(available_memory_bytes() * MEMORY_FRACTION / BYTES_PER_PARAM_HELD)
    used = min(requested, affordable)
    root = tempfile.mkdtemp(prefix="bench_async_checkpoint-", dir=ckpt_dir)
    try:
        (measured,) = run_ranks(_rank, 1, used, QUICK_HIDDEN if quick else HIDDEN, root,
                                ROUNDS, timeout_s=7200, torchrun_env=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rounds = measured.pop("rounds")
    first, last = rounds[0], rounds[-1]
    result = {
        **measured, "requested_params": requested, "capped_by_memory": used < requested,
        "memory_available_bytes": available_memory_bytes(), "checkpoint_dir_parent": ckpt_dir or tempfile.gettempdir(),
        "rounds": rounds,
        "stall_ratio": last["sync_stall_s"] / last["async_stall_s"],
        "stall_ratio_first_round": first["sync_stall_s"] / first["async_stall_s"],
        "bytes": {"sync": last["sync_bytes"], "async": last["async_bytes"]},
        "write_gbps": {"sync": last["sync_bytes"] / last["sync_stall_s"] / 1e9,
                       "async_background": last["async_bytes"] / last["async_write_s"] / 1e9},
        "median_step_s": statistics.median(r["step_s"] for r in rounds),
    }
    print_table(f"save stall: {result['params'] / 1e9:.3f}B parameters, {result['bytes']['sync'] / 1e9:.2f} GB "
                f"per checkpoint (1 CPU rank, one thread)",
                ["round", "sync stall s", "async stall s", "async write s", "async published s",
                 "step s", "step during write s"],
                [[r["round"], r["sync_stall_s"], r["async_stall_s"], r["async_write_s"], r["async_publish_s"],
                  r["step_s"], r["step_during_write_s"]] for r in rounds])
    print(f"stall ratio sync / async: {result['stall_ratio']:.1f}x (first round, staging buffers "
          f"allocated: {result['stall_ratio_first_round']:.1f}x); staging holds "
          f"{result['staging_bytes'] / 1e9:.2f} GB of host memory"
          + (f"; capped from {requested / 1e9:.1f}B parameters by the host's available memory"
             if result["capped_by_memory"] else ""))
    path = write_json(out_dir, "bench_async_checkpoint", result)
    print(f"wrote {path}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for the JSON result")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the plumbing only")
    parser.add_argument("--params", type=int, default=None, help=f"parameters of the stage (default {PARAMS:,})")
    parser.add_argument("--ckpt-dir", default=None, help="where the checkpoints are written (default: the temp dir)")
    args = parser.parse_args(argv)
    return run(args.out, args.quick, args.params, args.ckpt_dir)


if __name__ == "__main__":
    main()
