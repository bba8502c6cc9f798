"""Attention under M6's prefix-LM mask: today's path against torch's own SDPA, in one run.

The baseline a fused prefix-LM attention must beat. Contenders, q, k, v (B, H, S, D) fp32 on the
CPU, every sample with the same prefix_len and valid_len = S:

- ``unfused``: the model's attention core today (``m6_engine.model.attention``): q k^T, the fused
  masked softmax ``m6::masked_softmax`` (mask from the two lengths), probs v;
- ``sdpa_mask``: ``torch.nn.functional.scaled_dot_product_attention`` with the boolean prefix-LM
  mask (B, 1, S, S): the same function, what a user gets from torch in one line;
- ``sdpa_causal``: SDPA with ``is_causal=True``: a different, smaller mask (the prefix mask has
  more allowed pairs), the speed a causal model gets.

Per case: forward and forward+backward median times (contenders interleaved), their ratios to
``unfused``, the bytes each forward keeps for backward (tensors saved by autograd, counted through
``saved_tensors_hooks``: the (B, H, S, S) probabilities show up here), and how far ``unfused`` and
``sdpa_mask`` outputs and input gradients differ (they compute the same function). ``--quick``:
one small case, a check of the plumbing only.
"""

import argparse
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import m6_engine.ops as ops
from m6_engine.ops.reference import prefix_lm_mask
from tests.bench.common import print_table, time_fns, write_json


@dataclass(frozen=True)
class AttentionCase:
    """q, k, v of ``shape`` (B, H, S, D); every sample's first ``prefix_len`` positions are the
    bidirectional prefix, all S valid."""

    name: str
    shape: tuple
    prefix_len: int


def _cases(quick: bool):
    if quick:
        return [AttentionCase("quick [1,2,40,16] prefix 20", (1, 2, 40, 16), 20)]
    return [AttentionCase("m6 [8,16,528,64] prefix 272", (8, 16, 528, 64), 272),
            AttentionCase("[2,16,2048,64] prefix 1040", (2, 16, 2048, 64), 1040)]


def _contenders(case: AttentionCase):
    b, _, s, d = case.shape
    scale = d ** -0.5
    prefix = torch.full((b,), case.prefix_len, dtype=torch.int32)
    valid = torch.full((b,), s, dtype=torch.int32)
    allowed = prefix_lm_mask(prefix, valid, s, s)                                   # (B, 1, S, S)

    def unfused(q, k, v):
        probs = ops.masked_softmax(torch.matmul(q, k.transpose(-1, -2)), prefix, valid, scale)
        return torch.matmul(probs, v)

    return {"unfused": unfused,
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


def _bench_case(case: AttentionCase, iters: int) -> dict:
    contenders = _contenders(case)
    q, k, v = _inputs(case)
    grad = torch.randn(case.shape, generator=torch.Generator().manual_seed(1))

    def forward(fn):
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call

    def forward_backward(fn):
        def call():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad)
        return call

    fwd = time_fns({name: forward(fn) for name, fn in contenders.items()}, "cpu", warmup=1, iters=iters)
    fwd_bwd = time_fns({name: forward_backward(fn) for name, fn in contenders.items()}, "cpu",
                       warmup=1, iters=iters)
    saved, results = {}, {}
    for name, fn in contenders.items():
        counter = {"bytes": 0}
        q.grad = k.grad = v.grad = None
        with _saved_bytes(counter):
            out = fn(q, k, v)
        out.backward(grad)
        saved[name] = counter["bytes"]
        results[name] = (out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    difference = max((a - b).abs().max().item() for a, b in zip(results["unfused"], results["sdpa_mask"]))
    return {"case": case.name, "shape": list(case.shape), "prefix_len": case.prefix_len,
            "fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "saved_for_backward_bytes": saved,
            "unfused_vs_sdpa_mask_max_abs_difference": difference,
            "fwd_bwd_unfused_over_sdpa_mask": fwd_bwd["unfused"] / fwd_bwd["sdpa_mask"],
            "fwd_bwd_unfused_over_sdpa_causal": fwd_bwd["unfused"] / fwd_bwd["sdpa_causal"]}


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Every case of :func:`_cases`; print the table, write and return the JSON."""
    torch.manual_seed(0)
    rows = [_bench_case(case, iters=3 if quick else 5) for case in _cases(quick)]
    names = ("unfused", "sdpa_mask", "sdpa_causal")
    print_table(f"attention under the prefix-LM mask, fp32, CPU ({torch.get_num_threads()} threads): "
                "median ms, ratio to unfused, MiB saved for backward",
                ["case", *(f"{n} fwd" for n in names), *(f"{n} fwd+bwd" for n in names),
                 *(f"{n} saved" for n in names), "max |unfused - sdpa_mask|"],
                [[r["case"], *(f"{r['fwd_s'][n] * 1e3:.1f}" for n in names),
                  *(f"{r['fwd_bwd_s'][n] * 1e3:.1f} ({r['fwd_bwd_s'][n] / r['fwd_bwd_s']['unfused']:.2f})"
                    for n in names),
                  *(f"{r['saved_for_backward_bytes'][n] / 2**20:.1f}" for n in names),
                  f"{r['unfused_vs_sdpa_mask_max_abs_difference']:.1e}"] for r in rows])
    result = {"device": "cpu", "threads": torch.get_num_threads(), "cases": rows}
    write_json(out_dir, "bench_attention", result)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for bench_attention.json")
    parser.add_argument("--quick", action="store_true", help="one small case: checks the plumbing only")
    args = parser.parse_args(argv)
    run(args.out, args.quick)


if __name__ == "__main__":
    main()
