"""O2 optimizer: optimizer-state memory per parameter with and without ZeRO-1, and step time
(figures, not pass/fail).

Memory: the toy LM (tests/toy_lm.py, d 256, 4 layers, ffn 1024, vocab 1024: ~3.4M parameters) on
dp = 1, 2, 4 CPU ranks; bytes of optimizer state on each rank (``state_bytes``: summed nbytes of
fp32 masters and Adam moments) divided by the parameters of the model replica. Expected with bf16
parameters: 12 unsharded, 12 / dp with ``optimizer_sharding`` (fp32 parameters are their own
masters: 8 and 8 / dp).

Step time: one ``MixedPrecisionOptimizer.step`` (unscale, global norm and inf check, clip, AdamW,
copy to the half parameters) on a one-rank job vs the plain PyTorch step a user would write, the
same AdamW (foreach on the CPU, fused on CUDA) plus ``clip_grad_norm_`` on fp32 parameters. CPU:
fp32 parameters (d 512 toy LM, ~13M parameters); CUDA: bf16 O2 parameters (d 1024, 8 layers,
~110M) against fp32 parameters for torch.

Usage: ``python -m tests.bench.bench_optim --device cpu|cuda --out DIR`` (writes
``DIR/bench_optim_<device>.json``), or ``run(device, out_dir)`` from another script.
"""

import argparse

import torch

from tests.bench.common import print_table, time_fns, write_json
from tests.distributed import init_state, run_ranks
from tests.toy_lm import ToyLMConfig

MEMORY_MODEL = ToyLMConfig(vocab_size=1024, hidden=256, heads=4, ffn=1024, layers=4, seq_len=64)
TIMING_MODELS = {
    "cpu": ToyLMConfig(vocab_size=1024, hidden=512, heads=8, ffn=2048, layers=4, seq_len=64),
    "cuda": ToyLMConfig(vocab_size=32768, hidden=1024, heads=16, ffn=4096, layers=8, seq_len=64),
}


def _memory_rank(precision: str) -> dict:
    from m6_engine.optim import OptimizerConfig
    from tests.optim_loop import build

    state = init_state()
    out = {}
    for sharded in (False, True):
        cfg = OptimizerConfig(precision=precision, optimizer_sharding=sharded)
        model, optimizer = build(MEMORY_MODEL, state, cfg, total_steps=1, bucket_numel=1_000_000)
        out["numel"] = sum(p.numel() for p in model.params)
        out[sharded] = optimizer.state_bytes()
    return out


def _memory(dp_sizes=(1, 2, 4)) -> list[dict]:
    rows = []
    for precision in ("bf16", "fp32"):
        for dp in dp_sizes:
            ranks = run_ranks(_memory_rank, dp, precision, timeout_s=600)
            numel = ranks[0]["numel"]
            for sharded in (False, True):
                per_param = [r[sharded] / numel for r in ranks]
                rows.append({"precision": precision, "dp": dp, "optimizer_sharding": sharded,
                             "params_per_replica": numel, "bytes_per_param_max": max(per_param),
                             "bytes_per_param_min": min(per_param),
                             "bytes_per_param_sum_over_dp": sum(per_param)})
    return rows


def _timing_rank(device: str, iters: int) -> dict:
    import torch.nn.utils as nn_utils

    from m6_engine.optim import OptimizerConfig, decays
    from m6_engine.parallel import initialize
    from tests.optim_loop import build

    state = initialize(backend="nccl" if device == "cuda" else "gloo")
    cfg_model = TIMING_MODELS[device]
    precision = "bf16" if device == "cuda" else "fp32"
    model, optimizer = build(cfg_model, state, OptimizerConfig(precision=precision), total_steps=10 ** 6,
                             bucket_numel=40_000_000)
    gen = torch.Generator(device=state.device).manual_seed(0)
    model.grad_buffer.normal_(generator=gen)
    # The competitor: fp32 parameters with .grad, torch's AdamW and clip_grad_norm_.
    plain = [torch.nn.Parameter(p.detach().float().clone()) for p in model.params]
    for p in plain:
        p.grad = torch.randn(p.shape, generator=gen, device=p.device)
    kind = {"fused": True} if device == "cuda" else {"foreach": True}
    torch_adam = torch.optim.AdamW([{"params": [p for p in plain if decays(p)], "weight_decay": 0.01},
                                    {"params": [p for p in plain if not decays(p)], "weight_decay": 0.0}],
                                   lr=1e-4, **kind)

    def torch_step():
        nn_utils.clip_grad_norm_(plain, 1.0, foreach=True)
        torch_adam.step()

    seconds = time_fns({"m6": optimizer.step, "torch": torch_step}, device, warmup=2, iters=iters)
    return {"params": sum(p.numel() for p in model.params), "precision": precision,
            "adam_backend": optimizer.adam_backend, "m6_step_ms": seconds["m6"] * 1e3,
            "torch_step_ms": seconds["torch"] * 1e3,
            "ratio_m6_over_torch": seconds["m6"] / seconds["torch"]}


def run(device: str = "cpu", out_dir: str = "bench-results") -> dict:
    """Measure optimizer-state bytes (CPU ranks) and step time on ``device``; print, write JSON."""
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_optim --device cuda needs a GPU")
    memory = _memory()
    print_table("optimizer state per parameter per rank (bytes, summed tensor nbytes)",
                ["precision", "dp", "ZeRO-1", "params/replica", "max", "min", "sum over dp"],
                [[r["precision"], r["dp"], r["optimizer_sharding"], r["params_per_replica"],
                  r["bytes_per_param_max"], r["bytes_per_param_min"], r["bytes_per_param_sum_over_dp"]]
                 for r in memory])
    (timing,) = run_ranks(_timing_rank, 1, device, 10 if device == "cpu" else 30,
                          torchrun_env=False, timeout_s=1200)
    print_table(f"optimizer step on {device}: O2 MixedPrecisionOptimizer vs torch AdamW + clip_grad_norm_",
                ["params", "precision", "adam", "m6 ms", "torch ms", "m6 / torch"],
                [[timing["params"], timing["precision"], timing["adam_backend"], timing["m6_step_ms"],
                  timing["torch_step_ms"], timing["ratio_m6_over_torch"]]])
    result = {"device": device, "threads": torch.get_num_threads(), "memory": memory, "step_time": timing}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    path = write_json(out_dir, f"bench_optim_{device}", result)
    print(f"\nwrote {path}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="bench-results", help="folder for bench_optim_<device>.json")
    args = parser.parse_args(argv)
    run(args.device, args.out)


if __name__ == "__main__":
    main()
