"""The planner's per-rank memory against a measurement, for six small layouts on CPU gloo ranks.

Each case trains an M6 slice for a few steps with the real trainer (``m6_engine.plan.rehearse``:
``Trainer``, data from a small demo corpus, fp32, AdamW O2 step) and compares, on every rank:

- **measured**: what ``plan.rehearse`` measures, summed: the weights as stored, the fp32 gradient
  buffer and the optimizer state after the steps (``plan.measure.resident_bytes``), the peak of
  ZeRO-2/3's full-size gradient staging (``DataParallel.peak_staging_numel``) and of ZeRO-3's
  gathered parameters (``ShardedParameters.peak_gathered_numel``), and the most saved-for-backward
  bytes alive after any forward (``plan.measure.SavedActivations``). Each term is taken at its
  own peak, so the sum bounds what they hold at once. On the CPU there is no allocator peak to
  read, and process RSS holds the interpreter and libraries: neither is compared.
- **predicted**: the planner's same terms for that rank (``StageMemory.measured_terms``: every
  device term but the temporaries, which nothing above measures), its activations at the
  sequence length and loss tokens the measured micro-batches had; and, for reference,
  **planned**: the same with the activations of the longest sample (what a plan reports).

The goal is predicted / measured within 10% on every rank. Cases (``CASES``): plain (one rank),
tp 2 with sequence parallelism, pp 2 with 2 virtual stages (interleaved 1F1B), dp 2 with ZeRO-2,
dp 2 with ZeRO-3, tp 2 x pp 2. Model: M6-large's shape cut to 4 blocks of d 256, 8 heads and
16 + 128 positions (quick: d 64, 4 heads, 16 + 32), dropout 0.1, recompute none, micro-batch 1,
2 micro-batches per replica per step, 2 steps.

Usage: ``python -m tests.bench.bench_plan_vs_measured --out DIR [--quick]`` (writes
``DIR/bench_plan_vs_measured.json``).
"""

import tempfile

from tests.bench.common import print_table, quick_main, write_json
from tests.distributed import init_state, run_ranks

MODEL = {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "max_text_positions": 128}
QUICK_MODEL = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "max_text_positions": 32}
STEPS = 2
# name: (ranks, parallel, optimizer, train) overrides of plan.rehearse.rehearsal_job
CASES = {
    "plain": (1, {"tp": 1}, {}, {"global_batch": 2}),
    "tp 2, SP": (2, {"tp": 2, "sequence_parallel": True}, {}, {"global_batch": 2}),
    "pp 2, V 2": (2, {"tp": 1, "pp": 2, "virtual_stages": 2}, {}, {"global_batch": 2}),
    "dp 2, ZeRO-2": (2, {"tp": 1}, {"zero_stage": 2}, {"global_batch": 4}),
    "dp 2, ZeRO-3": (2, {"tp": 1}, {"zero_stage": 3}, {"global_batch": 4}),
    "tp 2 x pp 2": (4, {"tp": 2, "pp": 2}, {}, {"global_batch": 2}),
}
GOAL = 0.10


def _rank(corpus_dir: str, vocab_file: str, model: dict, parallel: dict, optimizer: dict,
          train: dict) -> dict:
    from m6_engine.plan.rehearse import rehearsal_job, rehearse

    job = rehearsal_job(corpus_dir, vocab_file, model=model, tp=parallel.pop("tp"), steps=STEPS, lr=1e-3,
                        timeout_s=120.0, parallel=parallel, optimizer=optimizer,
                        train={"recompute": "none", **train})
    with tempfile.TemporaryDirectory() as ckpt:
        r = rehearse(job, init_state(job.parallel.tp, job.parallel.pp), ckpt, check_reload=False)
    planned = r["predicted_total"] - r["activations"]["predicted_exact"] + r["activations"]["planned"]
    return {"rank": r["rank"], "layout": r["layout"], "measured": r["measured_total"],
            "predicted": r["predicted_total"], "planned": planned,
            "activations": (r["activations"]["measured"], r["activations"]["predicted_exact"]),
            "resident": r["resident"], "transient": r["transient"],
            "loss": r["steps"][-1]["loss"]}


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    from tests.training_job import build_corpus

    model = QUICK_MODEL if quick else MODEL
    rows, cases = [], []
    with tempfile.TemporaryDirectory() as folder:
        corpus = build_corpus(folder)
        model = {**model, "vocab_size": corpus.vocab_size}
        for name, (ranks, parallel, optimizer, train) in CASES.items():
            results = run_ranks(_rank, ranks, corpus.train, corpus.vocab_file, model, dict(parallel),
                                optimizer, train, timeout_s=300)
            for r in results:
                r["ratio"] = r["predicted"] / r["measured"]
                rows.append([name, r["rank"], r["measured"] / 2**20, r["predicted"] / 2**20,
                             f"{r['ratio']:.4f}", r["planned"] / 2**20,
                             r["activations"][0] / 2**20, r["activations"][1] / 2**20])
            fullest = max(results, key=lambda r: r["measured"])
            cases.append({"case": name, "layout": results[0]["layout"], "ranks": results,
                          "fullest_rank": fullest["rank"], "measured": fullest["measured"],
                          "predicted": fullest["predicted"], "ratio": fullest["ratio"],
                          "worst_ratio": max((r["ratio"] for r in results), key=lambda x: abs(x - 1))})
    print_table("per-rank memory: planner vs measured (MiB; measured = stored weights + gradient buffer + "
                "optimizer state + ZeRO staging / gathered peaks + peak saved activations)",
                ["case", "rank", "measured", "predicted", "pred/meas", "planned (longest)",
                 "activ meas", "activ pred"], rows)
    within = all(abs(c["worst_ratio"] - 1) <= GOAL for c in cases)
    print(f"\nevery rank within {GOAL:.0%}: {'yes' if within else 'NO'}")
    result = {"model": model, "quick": quick, "steps": STEPS, "goal": GOAL, "within_goal": within,
              "cases": cases}
    write_json(out_dir, "bench_plan_vs_measured", result)
    return result


if __name__ == "__main__":
    quick_main(run, __doc__.splitlines()[0])
