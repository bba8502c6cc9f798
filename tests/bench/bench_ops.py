"""Benchmark of the fused ops against their torch composites (figures, not pass/fail).

masked_softmax: fused ``m6::masked_softmax`` vs the unfused path every Megatron-style model runs,
    ``softmax((scale * x).masked_fill(~mask, finfo.min))`` with a materialised (B, 1, S, S) boolean
    mask built once outside the timed region (backward by autograd). Scores (B, H, S, S) at
    B=8, H=16, S=528 (16 patches + 256 + 256) with prefix 272 / valid 528, and a padded case;
    fp32 on the CPU, bf16 on CUDA, plus (4, 32, 2048, 2048) and (1, 32, 4096, 4096) on CUDA.
layer_norm: fused ``m6::layer_norm`` vs ``torch.nn.functional.layer_norm`` at (8 * 528, 1024),
    and (8 * 528, 4096) and (16384, 4096) on CUDA.

Timing: on a GPU, CUDA events around 50 back-to-back calls (tests/bench/common.py
``time_fns_cuda``); on the CPU, interleaved medians of whole calls.
Bandwidth: the bytes each kernel really moves, of the real dtypes: masked softmax forward reads
the visible keys of each row and writes every output element; its backward reads y and dy at
the visible keys and writes dx; LayerNorm forward reads x and writes y (weights, bias and the
fp32 mean / rstd counted too), backward reads dy, x and writes dx (+ weights and statistics).
The yardstick is a copy of the same tensor measured in the same run: ``torch.empty_like(x).copy_(x)``
on CUDA (the caching allocator makes the allocation free, as it is for the op's output), into a
preallocated tensor on the CPU (a fresh CPU tensor of this size would pay page faults the ops'
output cache avoids). "of copy" = the kernel's GB/s / the copy's GB/s.
Targets on the 2-core CPU: masked softmax fwd+bwd >= 10x the composite, layer_norm fwd+bwd at
least as fast as torch's. On an H100 / H200: masked softmax forward and LayerNorm forward and
backward >= 80% of copy bandwidth.

Usage: ``python -m tests.bench.bench_ops --device cpu|cuda --out DIR [--quick]`` (writes
``DIR/bench_ops_<device>.json``), or ``run(device, out_dir)`` from another script. ``--quick``
uses small shapes: a check of the benchmark's plumbing (`make gpu-check --dry-run`), not figures.
"""

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import m6_engine.ops as ops
from m6_engine.ops.reference import prefix_lm_mask
from tests.bench.common import gbps, print_table, time_calls, write_json


@dataclass(frozen=True)
class SoftmaxCase:
    """One masked-softmax problem: scores (B, H, Sq, Sk), the same lengths for every sample; query i
    at absolute position q_offset + i (the last rows of a long sequence when Sq < Sk)."""

    name: str
    shape: tuple
    prefix_len: int
    valid_len: int
    q_offset: int = 0


@dataclass(frozen=True)
class LayerNormCase:
    """One LayerNorm problem: x (rows, hidden)."""

    name: str
    rows: int
    hidden: int


def _softmax_cases(device: str, quick: bool):
    if quick:
        return [SoftmaxCase("quick [2,2,40,40] prefix 20", (2, 2, 40, 40), 20, 40)]
    cases = [SoftmaxCase("m6 [8,16,528,528] prefix 272", (8, 16, 528, 528), 16 + 256, 528),
             SoftmaxCase("m6 [8,16,528,528] padded, prefix 144 valid 400", (8, 16, 528, 528), 144, 400)]
    if device == "cuda":
        cases += [SoftmaxCase("[4,32,2048,2048] prefix 1040", (4, 32, 2048, 2048), 1040, 2048),
                  SoftmaxCase("[1,32,4096,4096] prefix 2064", (1, 32, 4096, 4096), 2064, 4096),
                  # Sk not a multiple of 8 (a KV cache of prefix + t keys): partial first/last chunks
                  SoftmaxCase("[4,32,2047,2047] prefix 1040", (4, 32, 2047, 2047), 1040, 2047),
                  # rows staged in shared memory, and past it (the streaming path)
                  SoftmaxCase("[1,8,256,32768] last rows, prefix 16384", (1, 8, 256, 32768), 16384, 32768,
                              32768 - 256),
                  SoftmaxCase("[1,4,128,131072] last rows, prefix 65536", (1, 4, 128, 131072), 65536, 131072,
                              131072 - 128)]
    return cases


def _layer_norm_cases(device: str, quick: bool):
    if quick:
        return [LayerNormCase("quick (64, 256)", 64, 256)]
    cases = [LayerNormCase("(8*528, 1024)", 8 * 528, 1024)]
    if device == "cuda":
        cases += [LayerNormCase("(8*528, 4096)", 8 * 528, 4096), LayerNormCase("(16384, 4096)", 16384, 4096)]
    return cases


def _composite_softmax(x, allowed, scale):
    # Megatron's unfused path: fill the masked scores with the dtype's lowest value, then softmax.
    return torch.softmax((x * scale).masked_fill(~allowed, torch.finfo(x.dtype).min), dim=-1)


def _fwd_bwd(fn, inputs, grad):
    """A callable running fn(*inputs) forward and backward (autograd.grad: no accumulation)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return lambda: torch.autograd.grad(fn(*inputs), leaves, grad)


def _copy_seconds(x: torch.Tensor, device: str, iters: int) -> float:
    """Seconds of one copy of ``x`` (module docstring: fresh on CUDA, preallocated on the CPU)."""
    if device == "cuda":
        return time_calls({"copy": lambda: torch.empty_like(x).copy_(x)}, device, iters)["copy"]
    dst = torch.empty_like(x)
    dst.copy_(x)  # touch every page once, outside the timing
    return time_calls({"copy": lambda: dst.copy_(x)}, device, iters)["copy"]


def _bandwidth(moved: int, seconds: float, copy_bytes: int, copy_seconds: float) -> dict:
    fused, copy = gbps(moved, seconds), gbps(copy_bytes, copy_seconds)
    return {"bytes": moved, "gbps": fused, "copy_gbps": copy, "copy_fraction": fused / copy}


def _bench_softmax(case, device, dtype, iters):
    b, h, sq, sk = case.shape
    scale = 0.125
    x = torch.randn(case.shape, device=device, dtype=dtype, requires_grad=True)  # (B, H, Sq, Sk)
    grad = torch.randn_like(x)
    prefix = torch.full((b,), case.prefix_len, device=device, dtype=torch.int32)
    valid = torch.full((b,), case.valid_len, device=device, dtype=torch.int32)
    # The op's (B,) form, made once: the timings are of the kernels, not of expanding an int.
    q_offset = torch.full((b,), case.q_offset, device=device, dtype=torch.int32)
    allowed = prefix_lm_mask(prefix, valid, sq, sk, q_offset)                   # (B, 1, Sq, Sk)
    fused = lambda t: ops.masked_softmax(t, prefix, valid, scale, q_offset)  # noqa: E731
    composite = lambda t: _composite_softmax(t, allowed, scale)    # noqa: E731
    with torch.no_grad():
        t_fused, t_comp = time_calls({"fused": lambda: fused(x), "composite": lambda: composite(x)},
                                     device, iters).values()
        y = fused(x)
        t_bwd = time_calls({"backward": lambda: torch.ops.m6.masked_softmax_backward(
            grad, y, prefix, valid, scale, q_offset)}, device, iters)["backward"]
    t_fused_fb, t_comp_fb = time_calls({"fused": _fwd_bwd(fused, (x,), grad),
                                        "composite": _fwd_bwd(composite, (x,), grad)}, device, iters).values()
    es, numel = x.element_size(), x.numel()
    visible = int(allowed.sum()) * h                        # keys the kernels read, over all rows
    t_copy = _copy_seconds(x.detach(), device, iters)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""),
            "fused_fwd_ms": t_fused * 1e3, "composite_fwd_ms": t_comp * 1e3,
            "fwd_speedup": t_comp / t_fused, "fused_bwd_ms": t_bwd * 1e3,
            "fused_fwd_bwd_ms": t_fused_fb * 1e3, "composite_fwd_bwd_ms": t_comp_fb * 1e3,
            "fwd_bwd_speedup": t_comp_fb / t_fused_fb, "copy_ms": t_copy * 1e3,
            "fwd": _bandwidth((visible + numel) * es, t_fused, 2 * numel * es, t_copy),
            "bwd": _bandwidth((2 * visible + numel) * es, t_bwd, 2 * numel * es, t_copy)}


def _bench_layer_norm(case, device, dtype, iters):
    # A few ms per call on the CPU: more samples, as one call is easily disturbed.
    iters = iters if device == "cuda" else 6 * iters
    n = case.hidden
    x = torch.randn(case.rows, n, device=device, dtype=dtype, requires_grad=True)  # (rows, N)
    w = (1 + 0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
    grad = torch.randn_like(x)
    fused = lambda x, w, b: ops.layer_norm(x, w, b, 1e-5)          # noqa: E731
    torch_ln = lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5)   # noqa: E731
    with torch.no_grad():
        t_fused, t_torch = time_calls({"fused": lambda: fused(x, w, b), "torch": lambda: torch_ln(x, w, b)},
                                      device, iters).values()
        _, mean, rstd = torch.ops.m6.layer_norm(x, w, b, 1e-5)
        t_bwd = time_calls({"backward": lambda: torch.ops.m6.layer_norm_backward(grad, x, w, mean, rstd)},
                           device, iters)["backward"]
    t_fused_fb, t_torch_fb = time_calls({"fused": _fwd_bwd(fused, (x, w, b), grad),
                                         "torch": _fwd_bwd(torch_ln, (x, w, b), grad)}, device, iters).values()
    es, numel = x.element_size(), x.numel()
    stats = 2 * 4 * case.rows                               # fp32 mean and rstd
    t_copy = _copy_seconds(x.detach(), device, iters)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""),
            "fused_fwd_ms": t_fused * 1e3, "torch_fwd_ms": t_torch * 1e3, "fwd_speedup": t_torch / t_fused,
            "fused_bwd_ms": t_bwd * 1e3,
            "fused_fwd_bwd_ms": t_fused_fb * 1e3, "torch_fwd_bwd_ms": t_torch_fb * 1e3,
            "fwd_bwd_speedup": t_torch_fb / t_fused_fb, "copy_ms": t_copy * 1e3,
            "fwd": _bandwidth(2 * numel * es + 3 * n * es + stats, t_fused, 2 * numel * es, t_copy),
            "bwd": _bandwidth(3 * numel * es + 3 * n * es + stats, t_bwd, 2 * numel * es, t_copy)}


def _print(title, results, baseline):
    columns = ["case", "dtype", "fwd ms", f"{baseline} fwd ms", "fwd x", "fwd+bwd ms",
               f"{baseline} fwd+bwd ms", "fwd+bwd x", "fwd GB/s", "fwd of copy", "bwd GB/s", "bwd of copy"]
    rows = [[r["case"], r["dtype"], r["fused_fwd_ms"], r[f"{baseline}_fwd_ms"], r["fwd_speedup"],
             r["fused_fwd_bwd_ms"], r[f"{baseline}_fwd_bwd_ms"], r["fwd_bwd_speedup"], r["fwd"]["gbps"],
             r["fwd"]["copy_fraction"], r["bwd"]["gbps"], r["bwd"]["copy_fraction"]] for r in results]
    print_table(title, columns, rows)


def run(device: str = "cpu", out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Both ops on ``device`` (small shapes when ``quick``); print tables, write and return the JSON."""
    device = torch.device(device).type
    ops.require_extension()
    if device == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_built()):
        raise RuntimeError("bench_ops --device cuda needs a GPU and the CUDA kernels (M6_BUILD_CUDA=1)")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    iters = 5 if device == "cpu" else 20
    if quick:
        iters = 3
    capability = ops.cpu_capability()
    print(f"device {device}, cpu capability {capability}, threads {torch.get_num_threads()}")
    softmax = [_bench_softmax(c, device, dtype, iters) for c in _softmax_cases(device, quick)]
    _print("masked_softmax: fused vs masked_fill + softmax", softmax, "composite")
    layer_norm = [_bench_layer_norm(c, device, dtype, iters) for c in _layer_norm_cases(device, quick)]
    _print("layer_norm: fused vs torch.nn.functional.layer_norm", layer_norm, "torch")
    result = {"device": device, "cpu_capability": capability, "threads": torch.get_num_threads(),
              "timing": "CUDA events, 50 back-to-back calls" if device == "cuda" else "wall clock, per call",
              "quick": quick, "masked_softmax": softmax, "layer_norm": layer_norm}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    path = write_json(out_dir, f"bench_ops_{device}", result)
    print(f"\nwrote {path}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="fused m6 ops vs torch composites")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="bench-results", help="folder for bench_ops_<device>.json")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the plumbing only")
    args = parser.parse_args(argv)
    run(args.device, args.out, args.quick)


if __name__ == "__main__":
    main()
