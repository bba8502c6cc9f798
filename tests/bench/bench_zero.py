"""ZeRO-1 vs ZeRO-2 (and ZeRO-3) on CPU ranks: gradient and parameter memory per rank and the dp
communication left exposed after backward (figures, not pass/fail).

Model: the toy LM (tests/toy_lm.py, d 256, 4 layers, ffn 1024, vocab 1024: ~3.4M parameters), fp32,
global batch 8 in micro-batches of 2 (2 per rank at dp 2, 1 at dp 4), buckets of 250k elements.

Memory, at dp = 2 and 4: bytes of the gradient buffer each rank holds between steps
(``DataParallel.grad_buffer_bytes``: the whole buffer at stage 1, the rank's shards at stage 2,
expected 1/dp of stage 1) and the most the stage-2 staging tensors held at once in a step
(``peak_staging_numel``, 4 bytes each), the transient full-size buckets.

ZeRO-3 parameters, at dp = 2 and 4: the stored shards (expected 1/dp of the stage) and the most
parameter elements gathered at once (root bucket + running layer + prefetched layer).

Overlap, at dp = 2, stages 1, 2 and 3 (stage 3's parameter all-gathers happen inside forward and
backward and are not counted): per step, the seconds spent in ``finish_grad_sync`` after the last
backward (the exposed communication: buckets still in flight or not yet launched) against the serial time
of that step's collectives run alone, back to back on buffers of the same sizes (stage 1: one
reduce-scatter per bucket; stage 2: one per bucket per micro-batch, its extra traffic). The ratio
exposed / serial is the part of the communication backward did not hide. Medians over the steps
after a warm-up one.

Usage: ``python -m tests.bench.bench_zero --out DIR`` (writes ``DIR/bench_zero.json``), or
``run(out_dir)`` from another script; ``quick=True`` is a seconds-long version for tests.
"""

import statistics
import time

from tests.bench.common import print_table, write_json, quick_main
from tests.distributed import init_state, run_ranks
from tests.toy_lm import ToyLMConfig

MODEL = ToyLMConfig(vocab_size=1024, hidden=256, heads=4, ffn=1024, layers=4, seq_len=64)
QUICK_MODEL = ToyLMConfig(vocab_size=128, hidden=64, heads=4, ffn=128, layers=4, seq_len=16)
BUCKET_NUMEL, QUICK_BUCKET_NUMEL = 250_000, 4_000


def _serial_comm_seconds(model, calls_per_bucket: int) -> float:
    """Seconds of the step's reduce-scatters run alone, synchronously, on fresh buffers."""
    import torch
    import torch.distributed as dist

    from m6_engine.parallel.collectives import reduce_scatter_single

    dist.barrier(group=model.group)
    start = time.perf_counter()
    for _ in range(calls_per_bucket):
        for bucket in model.buckets:
            full = torch.ones(bucket.numel)
            reduce_scatter_single(full[:bucket.numel // model.dp_size], full, group=model.group)
    return time.perf_counter() - start


def _rank(model_cfg: ToyLMConfig, bucket_numel: int, steps: int) -> dict:
    import torch.distributed as dist

    from m6_engine.optim import OptimizerConfig
    from tests.optim_loop import GLOBAL_BATCH, MICRO_BATCH, build, train_step

    state = init_state()
    micro_per_rank = GLOBAL_BATCH // MICRO_BATCH // state.dp_size
    out = {}
    for stage in (1, 2, 3):
        model, optimizer = build(model_cfg, state, OptimizerConfig(lr=1e-4, zero_stage=stage),
                                 total_steps=steps, bucket_numel=bucket_numel)
        finish, exposed = model.finish_grad_sync, []

        def timed_finish():
            start = time.perf_counter()
            finish()
            exposed.append(time.perf_counter() - start)

        model.finish_grad_sync = timed_finish     # what the schedule's finalize_grads calls
        step_seconds = []
        for step in range(steps):
            dist.barrier()
            start = time.perf_counter()
            train_step(model, optimizer, model_cfg, state, step)
            step_seconds.append(time.perf_counter() - start)
        serial = [_serial_comm_seconds(model, micro_per_rank if stage >= 2 else 1)
                  for _ in range(max(1, steps - 1))]
        measured = exposed[1:] or exposed
        out[stage] = {"params": sum(p.numel() for p in model.params), "buckets": len(model.buckets),
                      "grad_buffer_bytes": model.grad_buffer_bytes(),
                      "staging_peak_bytes": 4 * model.peak_staging_numel,
                      "exposed_s": statistics.median(measured), "serial_comm_s": statistics.median(serial),
                      "step_s": statistics.median(step_seconds[1:] or step_seconds)}
        sharded = model.sharded_params
        if sharded is not None:
            out[stage]["param_shard_bytes"] = sharded.shards.nbytes
            element = sharded.shards.element_size()
            out[stage]["param_gathered_peak_bytes"] = sharded.peak_gathered_numel * element
            out[stage]["param_whole_bytes"] = model.layout.numel * element
    return out


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Measure (see the module doc); print, write ``bench_zero.json``."""
    model_cfg, bucket_numel = (QUICK_MODEL, QUICK_BUCKET_NUMEL) if quick else (MODEL, BUCKET_NUMEL)
    steps = 3 if quick else 6
    memory, params, overlap = [], [], []
    for dp in (2, 4):
        ranks = run_ranks(_rank, dp, model_cfg, bucket_numel, steps, timeout_s=1200)
        one, two = ranks[0][1], ranks[0][2]
        memory.append({"dp": dp, "params_per_replica": one["params"], "buckets": one["buckets"],
                       "stage1_grad_bytes": max(r[1]["grad_buffer_bytes"] for r in ranks),
                       "stage2_grad_bytes": max(r[2]["grad_buffer_bytes"] for r in ranks),
                       "stage2_staging_peak_bytes": max(r[2]["staging_peak_bytes"] for r in ranks)})
        memory[-1]["stage2_over_stage1"] = memory[-1]["stage2_grad_bytes"] / memory[-1]["stage1_grad_bytes"]
        memory[-1]["stage2_with_staging_over_stage1"] = (
            (memory[-1]["stage2_grad_bytes"] + memory[-1]["stage2_staging_peak_bytes"])
            / memory[-1]["stage1_grad_bytes"])
        three = ranks[0][3]
        params.append({"dp": dp, "whole_bytes": three["param_whole_bytes"],
                       "shard_bytes": max(r[3]["param_shard_bytes"] for r in ranks),
                       "gathered_peak_bytes": max(r[3]["param_gathered_peak_bytes"] for r in ranks)})
        params[-1]["shard_over_whole"] = params[-1]["shard_bytes"] / params[-1]["whole_bytes"]
        params[-1]["peak_over_whole"] = params[-1]["gathered_peak_bytes"] / params[-1]["whole_bytes"]
        if dp == 2:
            for stage in (1, 2, 3):
                # the slowest rank's figures: the step waits for it
                exposed = max(r[stage]["exposed_s"] for r in ranks)
                serial = max(r[stage]["serial_comm_s"] for r in ranks)
                overlap.append({"dp": dp, "zero_stage": stage, "exposed_ms": exposed * 1e3,
                                "serial_comm_ms": serial * 1e3, "exposed_over_serial": exposed / serial,
                                "step_ms": max(r[stage]["step_s"] for r in ranks) * 1e3})
    print_table("gradient memory per rank (bytes): ZeRO-2 vs ZeRO-1",
                ["dp", "params", "buckets", "stage 1", "stage 2", "2 / 1", "stage 2 staging peak",
                 "(2 + staging) / 1"],
                [[m["dp"], m["params_per_replica"], m["buckets"], m["stage1_grad_bytes"],
                  m["stage2_grad_bytes"], m["stage2_over_stage1"], m["stage2_staging_peak_bytes"],
                  m["stage2_with_staging_over_stage1"]] for m in memory])
    print_table("ZeRO-3 parameters per rank (bytes): stored shards and the most gathered at once",
                ["dp", "whole stage", "shards", "shards / whole", "gathered peak", "peak / whole"],
                [[p["dp"], p["whole_bytes"], p["shard_bytes"], p["shard_over_whole"],
                  p["gathered_peak_bytes"], p["peak_over_whole"]] for p in params])
    print_table("dp communication exposed after the last backward (dp 2, CPU gloo)",
                ["stage", "exposed ms", "serial comm ms", "exposed / serial", "step ms"],
                [[o["zero_stage"], o["exposed_ms"], o["serial_comm_ms"], o["exposed_over_serial"],
                  o["step_ms"]] for o in overlap])
    result = {"quick": quick, "model": model_cfg.__dict__, "bucket_numel": bucket_numel,
              "memory": memory, "zero3_params": params, "overlap": overlap}
    path = write_json(out_dir, "bench_zero", result)
    print(f"\nwrote {path}")
    return result


def main(argv=None):
    quick_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
