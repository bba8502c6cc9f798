"""Benchmark of the fused ops against their torch composites (figures, not pass/fail).

masked_softmax: fused ``m6::masked_softmax`` vs the unfused path every Megatron-style model runs,
    ``softmax((scale * x).masked_fill(~mask, finfo.min))`` with a materialised (B, 1, S, S) boolean
    mask built once outside the timed region (backward by autograd). Scores (B, H, S, S) at
    B=8, H=16, S=528 (16 patches + 256 + 256) with prefix 272 / valid 528, and a padded case;
    fp32 on the CPU, bf16 on CUDA, plus (1, 32, 4096, 4096) on CUDA.
layer_norm: fused ``m6::layer_norm`` vs ``torch.nn.functional.layer_norm`` at (8 * 528, 1024).

Forward bandwidth = (bytes of the input read + bytes of the output written) / time, reported as a
fraction of the machine's copy bandwidth measured first (tests/bench/common.py).
Targets on the 2-core CPU: masked softmax fwd+bwd >= 10x the composite, fwd >= 25% of copy
bandwidth; layer_norm fwd+bwd at least as fast as torch's. On an H200: masked softmax fwd >= 80%
of copy bandwidth, layer_norm >= 70%.

Usage: ``python -m tests.bench.bench_ops --device cpu|cuda --out DIR`` (writes
``DIR/bench_ops_<device>.json``), or ``run(device, out_dir)`` from another script.
"""

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import m6_engine.ops as ops
from m6_engine.ops.reference import prefix_lm_mask
from tests.bench.common import copy_bandwidth, gbps, print_table, time_fns, write_json


@dataclass(frozen=True)
class SoftmaxCase:
    """One masked-softmax problem: scores (B, H, S, S), the same lengths for every sample."""

    name: str
    shape: tuple
    prefix_len: int
    valid_len: int


@dataclass(frozen=True)
class LayerNormCase:
    """One LayerNorm problem: x (rows, hidden)."""

    name: str
    rows: int
    hidden: int


def _softmax_cases(device: str):
    cases = [SoftmaxCase("m6 [8,16,528,528] prefix 272", (8, 16, 528, 528), 16 + 256, 528),
             SoftmaxCase("m6 [8,16,528,528] padded, prefix 144 valid 400", (8, 16, 528, 528), 144, 400)]
    if device == "cuda":
        cases.append(SoftmaxCase("[1,32,4096,4096] prefix 2064", (1, 32, 4096, 4096), 2064, 4096))
    return cases


def _layer_norm_cases(device: str):
    cases = [LayerNormCase("(8*528, 1024)", 8 * 528, 1024)]
    if device == "cuda":
        cases.append(LayerNormCase("(16384, 4096)", 16384, 4096))
    return cases


def _composite_softmax(x, allowed, scale):
    # Megatron's unfused path: fill the masked scores with the dtype's lowest value, then softmax.
    return torch.softmax((x * scale).masked_fill(~allowed, torch.finfo(x.dtype).min), dim=-1)


def _fwd_bwd(fn, inputs, grad):
    """A callable running fn(*inputs) forward and backward (autograd.grad: no accumulation)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return lambda: torch.autograd.grad(fn(*inputs), leaves, grad)


def _bench_softmax(case, device, dtype, copy_gbps, iters):
    b, h, s, _ = case.shape
    scale = 0.125
    x = torch.randn(case.shape, device=device, dtype=dtype, requires_grad=True)  # (B, H, S, S)
    grad = torch.randn_like(x)
    prefix = torch.full((b,), case.prefix_len, device=device, dtype=torch.int32)
    valid = torch.full((b,), case.valid_len, device=device, dtype=torch.int32)
    allowed = prefix_lm_mask(prefix, valid, s, s)                                # (B, 1, S, S)
    fused = lambda t: ops.masked_softmax(t, prefix, valid, scale)  # noqa: E731
    composite = lambda t: _composite_softmax(t, allowed, scale)    # noqa: E731
    with torch.no_grad():
        t_fused, t_comp = time_fns({"fused": lambda: fused(x), "composite": lambda: composite(x)},
                                   device, iters=iters).values()
    t_fused_fb, t_comp_fb = time_fns({"fused": _fwd_bwd(fused, (x,), grad),
                                      "composite": _fwd_bwd(composite, (x,), grad)}, device, iters=iters).values()
    fwd_gbps = gbps(2 * x.numel() * x.element_size(), t_fused)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""),
            "fused_fwd_ms": t_fused * 1e3, "composite_fwd_ms": t_comp * 1e3,
            "fwd_speedup": t_comp / t_fused,
            "fused_fwd_bwd_ms": t_fused_fb * 1e3, "composite_fwd_bwd_ms": t_comp_fb * 1e3,
            "fwd_bwd_speedup": t_comp_fb / t_fused_fb,
            "fused_fwd_gbps": fwd_gbps, "fused_fwd_copy_fraction": fwd_gbps / copy_gbps}


def _bench_layer_norm(case, device, dtype, copy_gbps, iters):
    # A few ms per call: more samples and a longer warm-up, as one call is easily disturbed.
    warmup, iters = 10, 6 * iters
    n = case.hidden
    x = torch.randn(case.rows, n, device=device, dtype=dtype, requires_grad=True)  # (rows, N)
    w = (1 + 0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
    grad = torch.randn_like(x)
    fused = lambda x, w, b: ops.layer_norm(x, w, b, 1e-5)          # noqa: E731
    torch_ln = lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5)   # noqa: E731
    with torch.no_grad():
        t_fused, t_torch = time_fns({"fused": lambda: fused(x, w, b), "torch": lambda: torch_ln(x, w, b)},
                                    device, warmup, iters).values()
    t_fused_fb, t_torch_fb = time_fns({"fused": _fwd_bwd(fused, (x, w, b), grad),
                                       "torch": _fwd_bwd(torch_ln, (x, w, b), grad)}, device, warmup, iters).values()
    fwd_gbps = gbps(2 * x.numel() * x.element_size(), t_fused)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""),
            "fused_fwd_ms": t_fused * 1e3, "torch_fwd_ms": t_torch * 1e3, "fwd_speedup": t_torch / t_fused,
            "fused_fwd_bwd_ms": t_fused_fb * 1e3, "torch_fwd_bwd_ms": t_torch_fb * 1e3,
            "fwd_bwd_speedup": t_torch_fb / t_fused_fb,
            "fused_fwd_gbps": fwd_gbps, "fused_fwd_copy_fraction": fwd_gbps / copy_gbps}


def _print(title, results, baseline):
    columns = ["case", "dtype", "fwd ms", f"{baseline} fwd ms", "fwd x", "fwd+bwd ms",
               f"{baseline} fwd+bwd ms", "fwd+bwd x", "fwd GB/s", "of copy"]
    keys = ["case", "dtype", "fused_fwd_ms", f"{baseline}_fwd_ms", "fwd_speedup", "fused_fwd_bwd_ms",
            f"{baseline}_fwd_bwd_ms", "fwd_bwd_speedup", "fused_fwd_gbps", "fused_fwd_copy_fraction"]
    print_table(title, columns, [[r[k] for k in keys] for r in results])


def run(device: str = "cpu", out_dir: str = "bench-results") -> dict:
    """Measure copy bandwidth, then both ops on ``device``; print tables, write and return the JSON."""
    device = torch.device(device).type
    ops.require_extension()
    if device == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_built()):
        raise RuntimeError("bench_ops --device cuda needs a GPU and the CUDA kernels (M6_BUILD_CUDA=1)")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    iters = 5 if device == "cpu" else 20
    copy_gbps = copy_bandwidth(device)
    capability = ops.cpu_capability()
    print(f"device {device}, cpu capability {capability}, threads {torch.get_num_threads()}, "
          f"copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    softmax = [_bench_softmax(c, device, dtype, copy_gbps, iters) for c in _softmax_cases(device)]
    _print("masked_softmax: fused vs masked_fill + softmax", softmax, "composite")
    layer_norm = [_bench_layer_norm(c, device, dtype, copy_gbps, iters) for c in _layer_norm_cases(device)]
    _print("layer_norm: fused vs torch.nn.functional.layer_norm", layer_norm, "torch")
    result = {"device": device, "cpu_capability": capability, "threads": torch.get_num_threads(),
              "copy_gbps": copy_gbps, "masked_softmax": softmax, "layer_norm": layer_norm}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    path = write_json(out_dir, f"bench_ops_{device}", result)
    print(f"\nwrote {path}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="fused m6 ops vs torch composites")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="bench-results", help="folder for bench_ops_<device>.json")
    args = parser.parse_args(argv)
    run(args.device, args.out)


if __name__ == "__main__":
    main()
