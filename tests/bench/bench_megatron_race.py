"""The race: our engine vs megatron-core, same GPT, same weights, same data, same machine, one run.

A tiny GPT (4 layers, d 256, 8 heads, vocab 21128, seq 528, no dropout) at tp = 2, pp = 2 on 4 CPU
ranks (gloo, one thread each), micro-batch 2, 8 micro-batches per step, non-interleaved 1F1B,
AdamW (constant lr 1e-4, weight decay 0.01 on matrices, no clipping), 10 steps:

- ours: ``m6_engine.training.Trainer`` (M6Model with our fused prefix-mask softmax and LayerNorm,
  our schedules, DataParallel buffers, MixedPrecisionOptimizer);
- megatron-core 0.16.1 as a user without Apex runs it: ``GPTModel`` with its local layer spec
  (``torch.nn.LayerNorm``, ``DotProductAttention`` whose softmax masks a materialised causal mask),
  its DDP, optimizer (``torch.optim.AdamW``) and ``get_forward_backward_func`` 1F1B schedule,
  with the CPU test shim of ``megatron_ext.testing`` for its CUDA-only calls.

megatron-core starts from our initial weights, converted (``megatron_ext.convert``). Both
vocabularies are unpadded, 21128 = 2 x 10564 (ours with ``vocab_multiple=4``, so tp * 4 divides it;
megatron-core's GPTModel has no padding mask, so a padding column would change its softmax): both
heads compute the same 10564 columns per rank. Each engine runs in its own 4 processes, ours first,
then megatron-core's from our initial weights, in the same run of this script: an engine's
process-wide settings (ours raises glibc's mmap and trim thresholds once, ``m6_engine.host_allocator``)
must neither help nor hinder the other, as they would sharing processes (they did before: the
setting made megatron-core's steps ~13% faster, 3.73 -> 3.26 s). The load average is printed before,
between and after the two halves. A step is timed from a barrier to the end of the optimizer step on each rank; its time
is the slowest rank's; the figure is the median over steps 3..10 (steady state). Losses are each
step's mean micro-batch loss (equal token counts, so also the token mean); they must agree to 1e-4.

The wall-clock figure is the race's. On a machine shared with other work (4 ranks on 2 cores and
neighbours) it swings from step to step, so the CPU time of the step is reported too: per step the
CPU seconds of the 4 processes (all their threads) summed, median over the same steps, and its
ratio. It measures the work each engine does, not when the scheduler let it run.

Usage: ``python -m tests.bench.bench_megatron_race --out DIR`` (writes
``DIR/bench_megatron_race.json``), or ``run(out_dir)`` from another script.
"""

import os
import statistics
import time

import torch

from m6_engine.data.batch import MicroBatch
from tests.bench.common import out_dir_main, print_table, write_json
from tests.distributed import init_state, run_ranks

TP, PP = 2, 2
MICRO_BATCH, MICROBATCHES, STEPS, WARMUP_STEPS = 2, 8, 10, 2
SEQ, VOCAB, SEED = 528, 21128, 1234
LOSS_TOLERANCE = 1e-4


def _model_config():
    from m6_engine.config import ModelConfig

    return ModelConfig(num_layers=4, hidden_size=256, num_heads=8, vocab_size=VOCAB,
                       vocab_multiple=4, max_text_positions=SEQ, num_patches=0, num_segments=0,
                       hidden_dropout=0.0, attention_dropout=0.0)


def _optimizer_config():
    from m6_engine.config import OptimizerConfig

    return OptimizerConfig(lr=1e-4, min_lr=1e-4, warmup_fraction=0.0, weight_decay=0.01, clip_grad=0.0)


def microbatches(step: int) -> list[dict]:
    """Step ``step``'s micro-batches: full-length LM sequences of arithmetic progressions over a
    band of the vocabulary (learnable, so the loss falls), loss on every next token."""
    out = []
    for m in range(MICROBATCHES):
        gen = torch.Generator().manual_seed(step * MICROBATCHES + m)
        start = torch.randint(0, 2000, (MICRO_BATCH, 1), generator=gen)
        stride = torch.randint(1, 4, (MICRO_BATCH, 1), generator=gen)
        seq = 104 + (start + stride * torch.arange(SEQ + 1)) % 2000          # (B, S + 1)
        out.append(MicroBatch(tokens=seq[:, :-1].contiguous(), labels=seq[:, 1:].contiguous(),
                              position_ids=torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
                              loss_mask=torch.ones(MICRO_BATCH, SEQ),
                              prefix_len=torch.zeros(MICRO_BATCH, dtype=torch.long),
                              valid_len=torch.full((MICRO_BATCH,), SEQ, dtype=torch.long)))
    return out


def _ours(state):
    """Our Trainer and its first-step weights (full state dict)."""
    from m6_engine.config import JobConfig, ParallelConfig, TrainConfig
    from m6_engine.convert import full_state_dict
    from m6_engine.training import Trainer

    job = JobConfig(model=_model_config(), parallel=ParallelConfig(tp=TP, pp=PP),
                    optimizer=_optimizer_config(),
                    train=TrainConfig(train_steps=STEPS, micro_batch=MICRO_BATCH,
                                      global_batch=MICRO_BATCH * MICROBATCHES, seed=SEED,
                                      peak_tflops=1.0))
    data = (batch for step in range(STEPS) for batch in microbatches(step))
    trainer = Trainer(job, state, data, log_rank_output=False)
    return trainer, full_state_dict(trainer.stage)


def _megatron(full):
    """megatron-core's GPTModel (local spec), DDP and optimizer, from our weights."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext import convert
    from megatron_ext.config import transformer_config
    from megatron_ext.training import build_optimizer, wrap_ddp

    model = _model_config()
    ps.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    # Megatron's defaults where they differ from M6's plain-PyTorch choices: fused softmax asked for
    # (fp32 inputs take its torch path without Apex in any case).
    config = transformer_config(model, tp=TP, pp=PP, masked_softmax_fusion=True)
    module = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                      pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                      share_embeddings_and_output_weights=True)
    convert.load_full_into_mcore(module, full, model, padded_vocab_size=VOCAB)
    ddp = wrap_ddp(module, config)
    return ddp, build_optimizer(ddp, config, _optimizer_config())


def _gpt_forward_step(data_iterator, model):
    from functools import partial

    from megatron_ext.model import masked_token_mean

    batch = next(data_iterator)
    loss = model(batch.tokens, batch.position_ids, None, labels=batch.labels)   # (B, S)
    return loss, partial(masked_token_mean, batch.loss_mask)


def _timed(fn):
    """fn()'s value, wall seconds and this process's CPU seconds (all threads), from a barrier."""
    torch.distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - start, time.process_time() - cpu_start


def _ours_rank() -> dict:
    """Our engine's steps on this rank; rank 0 also returns the initial weights (full state dict)."""
    state = init_state(tp=TP, pp=PP)
    trainer, full = _ours(state)
    ours = {"seconds": [], "cpu_seconds": [], "losses": []}
    for _ in range(STEPS):
        report, seconds, cpu = _timed(trainer.train_step)
        ours["seconds"].append(seconds)
        ours["cpu_seconds"].append(cpu)
        ours["losses"].append(float(report.loss_parts[0] / report.loss_parts[1])
                              if state.is_last_stage else None)
    return {"rank": state.rank, "ours": ours, "full": full if state.rank == 0 else None}


def _megatron_rank(full: dict) -> dict:
    """megatron-core's steps on this rank, from our initial weights ``full``."""
    from megatron_ext.testing import cpu_shim
    from megatron_ext.training import train_step

    init_state(tp=TP, pp=PP)   # the default process group megatron-core's groups are made from
    with cpu_shim():
        ddp, optimizer = _megatron(full)
    theirs = {"seconds": [], "cpu_seconds": [], "losses": []}
    for step in range(STEPS):
        with cpu_shim():
            losses, seconds, cpu = _timed(lambda: train_step(
                _gpt_forward_step, ddp, optimizer, iter(microbatches(step)),
                num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH))
        theirs["seconds"].append(seconds)
        theirs["cpu_seconds"].append(cpu)
        theirs["losses"].append(float(torch.stack([d["lm loss"] for d in losses]).mean())
                                if losses else None)
    return {"megatron": theirs}


def _step_times(results: list[dict], engine: str) -> list[float]:
    """Per step, the slowest rank's time."""
    return [max(times) for times in zip(*(r[engine]["seconds"] for r in results))]


def _step_cpu(results: list[dict], engine: str) -> list[float]:
    """Per step, the CPU seconds of all ranks together."""
    return [sum(times) for times in zip(*(r[engine]["cpu_seconds"] for r in results))]


def run(out_dir: str) -> dict:
    """Run the race once; print the figures and write ``out_dir/bench_megatron_race.json``."""
    import megatron.core

    load_before = os.getloadavg()[0]
    ours = run_ranks(_ours_rank, TP * PP, timeout_s=3000)
    load_between = os.getloadavg()[0]
    theirs = run_ranks(_megatron_rank, TP * PP, ours[0]["full"], timeout_s=3000)
    results = [{**o, **t} for o, t in zip(ours, theirs)]   # both in rank order
    last = next(r for r in results if r["ours"]["losses"][0] is not None)
    ours_t, theirs_t = _step_times(results, "ours"), _step_times(results, "megatron")
    ours_s = statistics.median(ours_t[WARMUP_STEPS:])
    theirs_s = statistics.median(theirs_t[WARMUP_STEPS:])
    ours_c, theirs_c = _step_cpu(results, "ours"), _step_cpu(results, "megatron")
    ours_cpu = statistics.median(ours_c[WARMUP_STEPS:])
    theirs_cpu = statistics.median(theirs_c[WARMUP_STEPS:])
    diffs = [abs(a - b) for a, b in zip(last["ours"]["losses"], last["megatron"]["losses"])]
    result = {
        "model": {"layers": 4, "hidden": 256, "heads": 8, "vocab": VOCAB, "seq": SEQ,
                  "micro_batch": MICRO_BATCH, "microbatches": MICROBATCHES, "tp": TP, "pp": PP},
        "megatron_core_version": megatron.core.__version__,
        "ours_step_s": ours_s, "megatron_step_s": theirs_s, "ratio": ours_s / theirs_s,
        "target_ratio": 0.8,
        "ours_step_s_all": ours_t, "megatron_step_s_all": theirs_t,
        "ours_step_cpu_s": ours_cpu, "megatron_step_cpu_s": theirs_cpu,
        "cpu_ratio": ours_cpu / theirs_cpu,
        "ours_step_cpu_s_all": ours_c, "megatron_step_cpu_s_all": theirs_c,
        "ours_losses": last["ours"]["losses"], "megatron_losses": last["megatron"]["losses"],
        "max_loss_difference": max(diffs), "losses_agree": max(diffs) <= LOSS_TOLERANCE,
        "load_average_1min": {"before": load_before, "between": load_between, "after": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
    }
    print_table("the race: tiny GPT, tp=2 pp=2 on 4 CPU ranks, 1F1B, AdamW",
                ["step", "ours loss", "megatron loss", "|diff|", "ours s", "megatron s", "ours cpu s",
                 "megatron cpu s"],
                [[i + 1, f"{a:.6f}", f"{b:.6f}", f"{d:.1e}", t1, t2, c1, c2]
                 for i, (a, b, d, t1, t2, c1, c2) in enumerate(zip(
                     result["ours_losses"], result["megatron_losses"], diffs, ours_t, theirs_t,
                     ours_c, theirs_c))])
    print(f"median step (steps {WARMUP_STEPS + 1}..{STEPS}): ours {ours_s:.3f} s, megatron-core "
          f"{theirs_s:.3f} s, ratio {result['ratio']:.3f} (goal <= 0.8); losses agree to "
          f"{max(diffs):.1e} (must be <= {LOSS_TOLERANCE})")
    print(f"CPU time per step (4 ranks summed, median): ours {ours_cpu:.3f} s, megatron-core "
          f"{theirs_cpu:.3f} s, ratio {result['cpu_ratio']:.3f}")
    print(f"load average (1 min) before / between / after: {load_before:.2f} / {load_between:.2f} / "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    write_json(out_dir, "bench_megatron_race", result)
    return result


def main(argv=None):
    out_dir_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
