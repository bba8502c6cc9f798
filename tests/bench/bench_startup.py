"""Rank start-up: building a ~1B-parameter M6 stage at tp 2 on 2 CPU ranks, three ways (figures,
not pass/fail).

  full_draw  ``init_method=mt19937_normal_init(std)``: every rank draws each full fp32 master weight
             on the CPU with torch's mt19937 ``normal_`` and keeps its shard (the path before
             per-shard initialisation, now the custom-InitMethod path);
  per_shard  the default: each rank draws only its shards, in place (``m6::normal_shard_``);
  resumed    ``draw_weights=False``, what a run resuming from a checkpoint builds: no draw at all
             (the checkpoint overwrites the weights), so it is the floor: allocation and constants.

Per build: seconds between two barriers (the slowest rank's: start-up waits for it; median over
the repeats, the three interleaved), and the elements each rank drew (per_shard and resumed counted
through ``m6::normal_shard_``; full_draw's are the full master weights of the stage's N(0, std)
matrices). Ratios: full_draw / per_shard (the issue's goal: >= 4) and per_shard / resumed.

What is timed is the model stage's construction (``M6Model``), where initialisation lives, not the
whole trainer to its first step: on this 2-core machine a 1B model's trainer would add about 12 GB
of gradients and AdamW state per rank and a first step of minutes, the same for the three builds.

Model (``CASE``): the m6-base preset widened to d 2048 (20 layers, 16 heads, ffn 8192, the 21128
vocabulary, 512 text positions, 16 patches of 2048): 1.06B parameters. One intra-op thread per rank.

Usage: ``python -m tests.bench.bench_startup --out DIR`` (writes ``DIR/bench_startup.json``);
``quick=True`` is a seconds-long version for tests.
"""

import dataclasses
import gc
import statistics
import time

from m6_engine.config import ModelConfig, model_preset
from tests.bench.common import print_table, quick_main, write_json
from tests.distributed import init_state, run_ranks

BUILDS = ("full_draw", "per_shard", "resumed")


@dataclasses.dataclass(frozen=True)
class StartupCase:
    """One start-up measurement: the model, its tensor-parallel size (one rank per tp shard, pp 1),
    and how many times each build is repeated."""

    model: ModelConfig
    tp: int = 2
    repeats: int = 3


CASE = StartupCase(model=model_preset("m6-base", num_layers=20, hidden_size=2048, num_heads=16))
QUICK_CASE = StartupCase(model=model_preset("tiny", num_layers=2, max_text_positions=64), repeats=1)


def _build(case: StartupCase, state, build: str):
    from m6_engine.model import M6Model
    from m6_engine.parallel.init import mt19937_normal_init

    custom = mt19937_normal_init(case.model.init_std) if build == "full_draw" else None
    return M6Model(case.model, state, seed=1, init_method=custom, draw_weights=build != "resumed")


def _full_draw_elements(stage) -> int:
    """Elements of the full master weights a full-draw build of ``stage`` draws on this rank: the
    N(0, std) matrices' full shapes (the word embedding's real rows)."""
    from m6_engine.parallel.roles import param_role

    total = 0
    for name, p in stage.named_parameters():
        if p.dim() != 2:
            continue
        tp_dim = param_role(p).tp_dim
        total += p.numel() * (stage.state.tp_size if tp_dim is not None else 1)
        if name.endswith("word.weight"):
            total -= (stage.embedding.word.padded_vocab_size - stage.config.vocab_size) * p.shape[1]
    return total


def _rank(case: StartupCase) -> dict:
    import torch.distributed as dist

    from m6_engine import ops
    from m6_engine.parallel.roles import param_role

    state = init_state(case.tp, 1)
    drawn, draw = [], ops.normal_shard_

    def counted(out, *args, **kwargs):
        drawn.append(out.numel())
        return draw(out, *args, **kwargs)

    ops.normal_shard_ = counted
    seconds = {b: [] for b in BUILDS}
    elements = {}
    for _ in range(case.repeats):
        for build in BUILDS:
            drawn.clear()
            gc.collect()
            dist.barrier()
            start = time.perf_counter()
            stage = _build(case, state, build)
            dist.barrier()
            seconds[build].append(time.perf_counter() - start)
            elements[build] = _full_draw_elements(stage) if build == "full_draw" else sum(drawn)
            if build == "per_shard":
                params = sum(p.numel() for p in stage.parameters())
                model_params = sum(p.numel() * (state.tp_size if param_role(p).tp_dim is not None else 1)
                                   for p in stage.parameters())
            del stage
    return {"seconds": seconds, "elements": elements, "rank_params": params, "model_params": model_params}


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Measure (see the module doc); print, write ``bench_startup.json``."""
    case = QUICK_CASE if quick else CASE
    ranks = run_ranks(_rank, case.tp, case, timeout_s=3600)
    seconds = {b: statistics.median(max(r["seconds"][b][i] for r in ranks) for i in range(case.repeats))
               for b in BUILDS}
    builds = [{"build": b, "seconds": seconds[b],
               "elements_drawn_per_rank": max(r["elements"][b] for r in ranks),
               "ns_per_drawn_element": (seconds[b] / max(r["elements"][b] for r in ranks) * 1e9
                                        if max(r["elements"][b] for r in ranks) else None)}
              for b in BUILDS]
    result = {"quick": quick, "model": dataclasses.asdict(case.model), "tp": case.tp, "ranks": case.tp,
              "repeats": case.repeats, "threads_per_rank": 1, "model_params": ranks[0]["model_params"],
              "params_per_rank": max(r["rank_params"] for r in ranks), "builds": builds,
              "full_draw_over_per_shard": seconds["full_draw"] / seconds["per_shard"],
              "per_shard_over_resumed": seconds["per_shard"] / seconds["resumed"]}
    print_table(f"M6 stage construction at tp {case.tp} on {case.tp} CPU ranks "
                f"({result['model_params'] / 1e9:.2f}B parameters, {result['params_per_rank'] / 1e9:.2f}B per rank; "
                f"slowest rank, median of {case.repeats})",
                ["build", "seconds", "elements drawn per rank", "ns per drawn element"],
                [[b["build"], b["seconds"], b["elements_drawn_per_rank"],
                  "-" if b["ns_per_drawn_element"] is None else b["ns_per_drawn_element"]] for b in builds])
    print(f"\nfull_draw / per_shard = {result['full_draw_over_per_shard']:.2f}x (goal >= 4); "
          f"per_shard / resumed = {result['per_shard_over_resumed']:.2f}x")
    path = write_json(out_dir, "bench_startup", result)
    print(f"\nwrote {path}")
    return result


def main(argv=None):
    quick_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
