"""Attention under M6's prefix-LM mask: the fused op against today's path and torch's SDPA, in one run.

Contenders, q, k, v (B, H, S, D) fp32 on the CPU, every sample with the same prefix_len and
valid_len = S:

- ``fused``: ``m6_engine.ops.prefix_lm_attention`` (``m6::prefix_lm_attention``): tiled, online
  softmax, masked tiles skipped from the lengths, backward from the saved log-sum-exp;
- ``unfused``: the model's ``attention_backend: unfused`` core: q k^T, the fused masked softmax
  ``m6::masked_softmax`` (mask from the two lengths), probs v;
- ``sdpa_mask``: ``torch.nn.functional.scaled_dot_product_attention`` with the boolean prefix-LM
  mask (B, 1, S, S): the same function, what a user gets from torch in one line;
- ``sdpa_causal``: SDPA with ``is_causal=True``: a different, smaller mask (the prefix mask has
  more allowed pairs), the speed a causal model gets.

Per case: forward and forward+backward median times (contenders interleaved) and their ratios, the
bytes each forward keeps for backward (tensors saved by autograd, counted through
``saved_tensors_hooks``: the (B, H, S, S) probabilities show up here), the peak memory of one
forward+backward (the growth of the peak resident set over the inputs, each contender in a fresh
process so no allocator cache of another one counts), and how far outputs and input gradients of
``fused`` and ``sdpa_mask`` are from ``unfused`` (they compute the same function).

Then a training step of two m6-base-width blocks (d 1024, 16 heads, S 528, prefix 272, micro-batch
4, the default dropouts, tp 1): forward, a loss, backward, the two backends' steps interleaved in
one process; the figure is unfused / fused step time.

``--quick``: small sizes, a check of the plumbing only.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import m6_engine.ops as ops
from m6_engine.ops.reference import prefix_lm_mask
from tests.bench.common import print_table, time_fns, write_json, quick_main
from tests.distributed import run_ranks

CONTENDERS = ("fused", "unfused", "sdpa_mask", "sdpa_causal")


@dataclass(frozen=True)
class AttentionCase:
    """q, k, v of ``shape`` (B, H, S, D); every sample's first ``prefix_len`` positions are the
    bidirectional prefix, all S valid."""

    name: str
    shape: tuple
    prefix_len: int


@dataclass(frozen=True)
class StepCase:
    """Two transformer blocks of width ``hidden`` trained on (``batch``, ``seq``) with ``prefix_len``."""

    hidden: int
    heads: int
    seq: int
    prefix_len: int
    batch: int
    layers: int = 2


def _cases(quick: bool):
    if quick:
        return [AttentionCase("quick [1,2,40,16] prefix 20", (1, 2, 40, 16), 20)]
    return [AttentionCase("m6 [8,16,528,64] prefix 272", (8, 16, 528, 64), 272),
            AttentionCase("[2,16,2048,64] prefix 1040", (2, 16, 2048, 64), 1040)]


def _step_case(quick: bool) -> StepCase:
    return StepCase(64, 4, 40, 20, 2) if quick else StepCase(1024, 16, 528, 272, 4)


def _contenders(case: AttentionCase):
    b, _, s, d = case.shape
    scale = d ** -0.5
    prefix = torch.full((b,), case.prefix_len, dtype=torch.int32)
    valid = torch.full((b,), s, dtype=torch.int32)
    allowed = prefix_lm_mask(prefix, valid, s, s)                                   # (B, 1, S, S)

    def unfused(q, k, v):
        probs = ops.masked_softmax(torch.matmul(q, k.transpose(-1, -2)), prefix, valid, scale)
        return torch.matmul(probs, v)

    return {"fused": lambda q, k, v: ops.prefix_lm_attention(q, k, v, prefix, valid, scale=scale),
            "unfused": unfused,
            "sdpa_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                                         scale=scale),
            "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                           scale=scale)}


@contextlib.contextmanager
def _saved_bytes(counter: dict):
    """Count the bytes of the distinct storages autograd saves for backward inside the block."""
    seen = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            counter["bytes"] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _inputs(case: AttentionCase, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(case.shape, generator=gen).requires_grad_() for _ in range(3)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_rank(case: AttentionCase, name: str) -> int:
    """Bytes the peak resident set grows by during one forward+backward of ``name`` (fresh process)."""
    torch.set_num_threads(int(os.environ.get("M6_BENCH_THREADS", "2")))
    q, k, v = _inputs(case)
    grad = torch.randn(case.shape)
    fn = _contenders(case)[name]
    with open("/proc/self/clear_refs", "w") as f:   # resets the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    fn(q, k, v).backward(grad)
    return (_status_kib("VmHWM") - before) * 1024


def _peak_bytes(case: AttentionCase) -> dict:
    threads = str(torch.get_num_threads())
    os.environ["M6_BENCH_THREADS"] = threads
    return {name: run_ranks(_peak_rank, 1, case, name, timeout_s=600, torchrun_env=False)[0]
            for name in CONTENDERS}


def attention_calls(fn, q, k, v, grad):
    """The two timed calls of an attention ``fn(q, k, v)``: forward (no graph), and forward+backward."""
    def forward():
        with torch.no_grad():
            return fn(q, k, v)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    return forward, forward_backward


def _max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _bench_case(case: AttentionCase, iters: int) -> dict:
    contenders = _contenders(case)
    q, k, v = _inputs(case)
    grad = torch.randn(case.shape, generator=torch.Generator().manual_seed(1))

    calls = {name: attention_calls(fn, q, k, v, grad) for name, fn in contenders.items()}
    fwd = time_fns({name: c[0] for name, c in calls.items()}, "cpu", warmup=1, iters=iters)
    fwd_bwd = time_fns({name: c[1] for name, c in calls.items()}, "cpu", warmup=1, iters=iters)
    saved, results = {}, {}
    for name, fn in contenders.items():
        counter = {"bytes": 0}
        q.grad = k.grad = v.grad = None
        with _saved_bytes(counter):
            out = fn(q, k, v)
        out.backward(grad)
        saved[name] = counter["bytes"]
        results[name] = (out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    peak = _peak_bytes(case)
    return {"case": case.name, "shape": list(case.shape), "prefix_len": case.prefix_len,
            "fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "saved_for_backward_bytes": saved, "fwd_bwd_peak_bytes": peak,
            "fused_vs_unfused_max_abs_difference": _max_difference(results["fused"], results["unfused"]),
            "unfused_vs_sdpa_mask_max_abs_difference": _max_difference(results["unfused"], results["sdpa_mask"]),
            "fwd_fused_over_sdpa_mask": fwd["fused"] / fwd["sdpa_mask"],
            "fwd_bwd_fused_over_sdpa_mask": fwd_bwd["fused"] / fwd_bwd["sdpa_mask"],
            "fwd_bwd_fused_over_sdpa_causal": fwd_bwd["fused"] / fwd_bwd["sdpa_causal"],
            "fwd_bwd_fused_over_unfused": fwd_bwd["fused"] / fwd_bwd["unfused"],
            "peak_fused_over_unfused": peak["fused"] / peak["unfused"]}


def _step_rank(step: StepCase, iters: int, threads: int) -> dict:
    """Median step time of the two backends' blocks, steps interleaved, in this one process."""
    from m6_engine.config import model_preset
    from m6_engine.model.block import TransformerBlock, run_blocks
    from m6_engine.model.common import ParamInit
    from m6_engine.parallel.random import seed_parallel_rng
    from tests.distributed import init_state

    torch.set_num_threads(threads)
    state = init_state()
    tracker = seed_parallel_rng(0, state)
    init = ParamInit(seed=0, std=0.02, dtype=torch.float32, device=torch.device("cpu"))
    blocks = {}
    for backend in ("fused", "unfused"):
        config = model_preset("m6-base", num_layers=step.layers, hidden_size=step.hidden, num_heads=step.heads,
                              attention_backend=backend)
        chosen = ops.select_ops(True, backend, "cpu")
        blocks[backend] = torch.nn.ModuleList(
            TransformerBlock(config, state, init, chosen, f"layers.{i}.", tracker) for i in range(step.layers)).train()
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(step.batch, step.seq, step.hidden, generator=gen)
    prefix = torch.full((step.batch,), step.prefix_len, dtype=torch.int64)
    valid = torch.full((step.batch,), step.seq, dtype=torch.int64)

    def train_step(backend):
        def call():
            model = blocks[backend]
            model.zero_grad(set_to_none=True)
            h = h0.clone().requires_grad_()
            out = run_blocks(model, h, prefix, valid, "none", tracker)
            out.square().mean().backward()
        return call

    return time_fns({b: train_step(b) for b in blocks}, "cpu", warmup=1, iters=iters)


def _bench_step(step: StepCase, iters: int) -> dict:
    (times,) = run_ranks(_step_rank, 1, step, iters, torch.get_num_threads(), timeout_s=900, torchrun_env=False)
    return {"shape": {"hidden": step.hidden, "heads": step.heads, "seq": step.seq, "prefix_len": step.prefix_len,
                      "micro_batch": step.batch, "layers": step.layers},
            "step_s": times, "unfused_over_fused": times["unfused"] / times["fused"]}


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Every case of :func:`_cases` and the blocks' step; print the tables, write and return the JSON."""
    torch.manual_seed(0)
    rows = [_bench_case(case, iters=3 if quick else 5) for case in _cases(quick)]
    step = _bench_step(_step_case(quick), iters=2 if quick else 3)
    threads = torch.get_num_threads()
    print_table(f"attention under the prefix-LM mask, fp32, CPU ({threads} threads): median ms "
                "(ratio to fused), MiB saved for backward, MiB peak of fwd+bwd",
                ["case", *(f"{n} fwd" for n in CONTENDERS), *(f"{n} fwd+bwd" for n in CONTENDERS),
                 *(f"{n} saved" for n in CONTENDERS), *(f"{n} peak" for n in CONTENDERS),
                 "max |fused - unfused|"],
                [[r["case"],
                  *(f"{r['fwd_s'][n] * 1e3:.1f} ({r['fwd_s'][n] / r['fwd_s']['fused']:.2f})" for n in CONTENDERS),
                  *(f"{r['fwd_bwd_s'][n] * 1e3:.1f} ({r['fwd_bwd_s'][n] / r['fwd_bwd_s']['fused']:.2f})"
                    for n in CONTENDERS),
                  *(f"{r['saved_for_backward_bytes'][n] / 2**20:.1f}" for n in CONTENDERS),
                  *(f"{r['fwd_bwd_peak_bytes'][n] / 2**20:.1f}" for n in CONTENDERS),
                  f"{r['fused_vs_unfused_max_abs_difference']:.1e}"] for r in rows])
    print_table(f"training step of {step['shape']['layers']} blocks, d {step['shape']['hidden']}, "
                f"{step['shape']['heads']} heads, S {step['shape']['seq']}, micro-batch "
                f"{step['shape']['micro_batch']}, fp32 CPU: median s",
                ["fused", "unfused", "unfused / fused"],
                [[f"{step['step_s']['fused']:.3f}", f"{step['step_s']['unfused']:.3f}",
                  f"{step['unfused_over_fused']:.2f}"]])
    result = {"device": "cpu", "threads": threads, "cases": rows, "layer_step": step}
    write_json(out_dir, "bench_attention", result)
    return result


def main(argv=None):
    quick_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
