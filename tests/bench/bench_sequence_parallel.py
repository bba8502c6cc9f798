"""Activation memory per rank with and without sequence parallelism, on CPU ranks (figures only).

What is measured: the bytes autograd keeps for backward during one forward of M6 transformer
blocks (a middle pipeline stage: no embedding, no head), counted through
``torch.autograd.graph.saved_tensors_hooks`` over distinct storages, parameters excluded. That is
the activation memory a stage holds per micro-batch in flight; it does not depend on the device.

Cases: tp = 1 (the whole layer on one rank), and tp = 2 and 4 with and without SP, each under
recompute "none" and "selective" (selective drops the attention core's saved tensors, the
S x S-sized part). Without SP only the tp-split parts shrink (the attention core's heads and the
FFN's inner activations); the LayerNorm inputs and outputs, residuals and dropouts are replicated.
With SP every one of them holds S / tp positions, so the ideal is tp = 1's bytes / tp
(``sp_vs_ideal`` = measured / ideal; Korthikanti et al.'s analysis gives the same 1 / t).

Model: d 256, 8 heads, ffn 1024, 2 blocks, S = 16 patches + 240 text positions, micro-batch 2,
fp32, fused kernels where built, dropout 0.1 (its masks are activations too).

Usage: ``python -m tests.bench.bench_sequence_parallel --out DIR`` (writes
``DIR/bench_sequence_parallel.json``); ``quick=True`` is a seconds-long version for tests.
"""

import dataclasses

from tests.bench.common import print_table, quick_main, write_json
from tests.distributed import init_state, run_ranks

CONFIG = dict(num_layers=2, hidden_size=256, num_heads=8, vocab_size=1000, max_text_positions=240,
              num_patches=16, patch_feature_dim=64, hidden_dropout=0.1, attention_dropout=0.1)
QUICK_CONFIG = dict(CONFIG, hidden_size=64, num_heads=4, max_text_positions=48)
MICRO_BATCH = 2


def _saved_bytes(config, state, sequence_parallel: bool, recompute: str) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one forward of the blocks."""
    import torch

    from m6_engine.model import M6Model
    from m6_engine.parallel import seed_parallel_rng

    tracker = seed_parallel_rng(1, state)
    stage = M6Model(config, state, pre_process=False, post_process=False, recompute=recompute,
                    rng_tracker=tracker, sequence_parallel=sequence_parallel).train()
    params = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    seq = config.num_patches + config.max_text_positions
    spec = stage.activation_spec(MICRO_BATCH, seq)
    h = torch.randn(spec.shape, requires_grad=True)
    batch = _lengths_batch(MICRO_BATCH, seq)
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(batch, h)
    out.sum().backward()      # the graph it measured is a working one
    return sum(storages.values())


def _lengths_batch(b: int, s: int):
    import torch

    from m6_engine.data.batch import MicroBatch

    zeros = torch.zeros(b, s, dtype=torch.int64)
    return MicroBatch(tokens=zeros, position_ids=zeros, prefix_len=torch.full((b,), s // 2),
                      valid_len=torch.full((b,), s))


def _rank(config: dict, tp: int, cases: list) -> dict:
    from m6_engine.config import ModelConfig

    state = init_state(tp=tp)
    model_config = ModelConfig(**config)
    return {f"{sp}/{recompute}": _saved_bytes(model_config, state, sp, recompute) for sp, recompute in cases}


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    config = QUICK_CONFIG if quick else CONFIG
    modes = ("none", "selective")
    (whole,) = run_ranks(_rank, 1, config, 1, [(False, m) for m in modes], timeout_s=300)
    rows, table = [], []
    for tp in (2, 4):
        measured = run_ranks(_rank, tp, config, tp, [(sp, m) for sp in (False, True) for m in modes],
                             timeout_s=300)[0]
        for mode in modes:
            one, plain, sp = whole[f"False/{mode}"], measured[f"False/{mode}"], measured[f"True/{mode}"]
            row = {"tp": tp, "recompute": mode, "tp1_mib": one / 2**20, "no_sp_mib": plain / 2**20,
                   "sp_mib": sp / 2**20, "sp_vs_no_sp": sp / plain, "sp_vs_ideal": sp / (one / tp)}
            rows.append(row)
            table.append([tp, mode, row["tp1_mib"], row["no_sp_mib"], row["sp_mib"], row["sp_vs_no_sp"],
                          row["sp_vs_ideal"]])
    print_table("activation memory per rank (saved for backward, 2 blocks, one micro-batch)",
                ["tp", "recompute", "tp 1 MiB", "tp, no SP MiB", "tp, SP MiB", "SP / no SP",
                 "SP / (tp 1 / tp)"], table)
    result = {"config": dataclasses.asdict(_model_config(config)), "micro_batch": MICRO_BATCH,
              "quick": quick, "cases": rows}
    write_json(out_dir, "bench_sequence_parallel", result)
    return result


def _model_config(config: dict):
    from m6_engine.config import ModelConfig

    return ModelConfig(**config)


if __name__ == "__main__":
    quick_main(run, __doc__.splitlines()[0])
