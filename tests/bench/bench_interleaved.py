"""Pipeline bubble of plain vs interleaved 1F1B on CPU ranks (figures, not pass/fail).

The toy LM of tests/toy_lm.py (d 256, 4 heads, ffn 1024, 8 layers, seq 128, vocab 1024), m = 8
micro-batches of one sequence per step, trained at pp = 2 and pp = 4 with V = 1 (plain 1F1B) and
V = 2 (interleaved: 2 model chunks per rank), one thread per rank. Each rank's schedule timers
give its bubble: the share of the step it was not computing (waiting for a neighbour, p2p,
gradient sync). Compared with the ideal bubble of equal-time stages and free transfers,

    bubble / busy = (pp - 1) / (V m),   i.e. a bubble fraction of (pp - 1) / (V m + pp - 1)

Reported per layout: the step time (fastest of the timed steps, a step lasting until its slowest
rank is done), the mean and per-rank bubble fraction, the formula, the interleaved step time over
the plain one at the same pp (measured in the same run), and per rank the compute seconds and the
seconds spent inside p2p calls (waiting for the neighbour included: V = 2 makes twice the
transfers, each a synchronisation point). On a machine with fewer free cores
than ranks (pp = 4 here on a shared 2-core box) the ranks also wait for a core, which the timers
count as compute: the figures then say little about the schedule, and the load average is printed.

Usage: ``python -m tests.bench.bench_interleaved --out DIR`` (writes
``DIR/bench_interleaved.json``), ``--quick`` (tiny sizes, pp = 2 only: checks the plumbing), or
``run(out_dir)`` from another script.
"""

import os
import statistics
import time

import torch

from tests.bench.common import print_table, write_json, quick_main
from tests.distributed import init_state, run_ranks
from tests.toy_lm import ToyLMConfig, ToyLMStage, forward_step, microbatches, ops_for_tests

CONFIG = ToyLMConfig(vocab_size=1024, hidden=256, heads=4, ffn=1024, layers=8, seq_len=128)
QUICK_CONFIG = ToyLMConfig(vocab_size=64, hidden=32, heads=2, ffn=64, layers=4, seq_len=16)
MICROBATCHES = 8
LAYOUTS = [(2, 1), (2, 2), (4, 1), (4, 2)]
QUICK_LAYOUTS = [(2, 1), (2, 2)]


def _bench_rank(cfg: ToyLMConfig, pp: int, virtual_stages: int, m: int, warmup_steps: int,
                timed_steps: int) -> dict:
    from m6_engine.parallel import DataParallel, TensorSpec, forward_backward, model_grad_sync

    state = init_state(tp=1, pp=pp)
    ops = ops_for_tests()
    chunks = [ToyLMStage(cfg, state, ops, chunk=c, virtual_stages=virtual_stages)
              for c in range(virtual_stages)]
    model = DataParallel(torch.nn.ModuleList(chunks), state)
    spec = TensorSpec((1, cfg.seq_len, cfg.hidden))
    batches = microbatches(cfg, 0, m, 1)
    seconds, bubbles, busy, transfers = [], [], [], []
    for step in range(warmup_steps + timed_steps):
        model.zero_grad_buffer()
        torch.distributed.barrier()
        start = time.perf_counter()
        result = forward_backward("1f1b", forward_step=forward_step, data_iterator=iter(batches),
                                  model=chunks if virtual_stages > 1 else chunks[0],
                                  num_microbatches=m, state=state, tensor_spec=spec,
                                  **model_grad_sync(model, state))
        elapsed = time.perf_counter() - start
        if step >= warmup_steps:
            seconds.append(elapsed)
            bubbles.append(result.timers.bubble_fraction)
            busy.append(result.timers.busy_s)
            transfers.append(result.timers.p2p_s)
    return {"stage": state.pp_rank, "step_s": seconds, "bubble_fraction": statistics.median(bubbles),
            "busy_s": statistics.median(busy), "p2p_s": statistics.median(transfers)}


def formula_bubble_fraction(pp: int, virtual_stages: int, m: int) -> float:
    """Ideal bubble share of a step: (pp - 1) / (V m + pp - 1)."""
    return (pp - 1) / (virtual_stages * m + pp - 1)


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Time every layout; print a table and write ``out_dir/bench_interleaved.json``."""
    cfg = QUICK_CONFIG if quick else CONFIG
    m = 4 if quick else MICROBATCHES
    warmup_steps, timed_steps = (0, 1) if quick else (1, 4)
    load_before = os.getloadavg()[0]
    rows = []
    for pp, v in QUICK_LAYOUTS if quick else LAYOUTS:
        ranks = run_ranks(_bench_rank, pp, cfg, pp, v, m, warmup_steps, timed_steps, timeout_s=1800)
        per_rank = [r["bubble_fraction"] for r in ranks]
        rows.append({"pp": pp, "virtual_stages": v, "microbatches": m,
                     "step_s": min(max(times) for times in zip(*(r["step_s"] for r in ranks))),
                     "bubble_fraction_per_rank": per_rank,
                     "bubble_fraction": statistics.mean(per_rank),
                     "busy_s_per_rank": [r["busy_s"] for r in ranks],
                     "p2p_s_per_rank": [r["p2p_s"] for r in ranks],
                     "formula_bubble_fraction": formula_bubble_fraction(pp, v, m)})
    plain = {row["pp"]: row["step_s"] for row in rows if row["virtual_stages"] == 1}
    for row in rows:
        row["step_over_plain"] = row["step_s"] / plain[row["pp"]]
    result = {"model": {"hidden": cfg.hidden, "heads": cfg.heads, "ffn": cfg.ffn, "layers": cfg.layers,
                        "seq_len": cfg.seq_len, "vocab": cfg.vocab_size, "micro_batch": 1},
              "layouts": rows, "cpu_count": os.cpu_count(),
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}}
    print_table(f"pipeline bubble, m = {m}, one thread per rank",
                ["pp", "V", "step s", "vs V=1", "bubble", "formula", "bubble per rank", "compute s (max)",
                 "in p2p s (max)"],
                [[r["pp"], r["virtual_stages"], r["step_s"], r["step_over_plain"], r["bubble_fraction"],
                  r["formula_bubble_fraction"], " ".join(f"{b:.3f}" for b in r["bubble_fraction_per_rank"]),
                  max(r["busy_s_per_rank"]), max(r["p2p_s_per_rank"])]
                 for r in rows])
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    write_json(out_dir, "bench_interleaved", result)
    return result


def main(argv=None):
    quick_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
