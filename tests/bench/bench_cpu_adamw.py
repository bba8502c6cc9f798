"""The fused CPU AdamW step (ZeRO-Offload's host step) against torch's AdamW and this machine's copy bandwidth, in one run.

One fp32 tensor of N elements (N = 100M; ``--quick``: 2M), lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01, contenders:

- ``ours``: ``m6_engine.ops.adamw_step_`` (``m6::adamw_step_``): one vectorised, threaded pass;
- ``ours_bf16_copy``: the same, also writing the updated weights as bf16 into a second buffer (the
  half weights an offloaded step sends back to the GPU; pinned when CUDA is available);
- ``torch_fused``: ``torch.optim.AdamW(fused=True)`` (its CPU kernel; the error string is recorded
  instead if it raises);
- ``torch_fused_bf16_copy``: torch_fused, then ``copy.copy_(param)``: what torch needs for the
  bf16 weights (a second pass over param);
- ``torch_foreach``: ``torch.optim.AdamW(foreach=True)`` (m6's AdamW backend on the CPU today);
- ``copy``: ``dst.copy_(src)`` of two fp32 buffers of min(N, 64M) elements, counted as bytes read +
  bytes written: the bandwidth reference of the issue. A plain store first reads the line it
  writes, so this counts 2 of the 3 bytes the memory moves per byte copied;
- ``inplace``: ``a.mul_(1.0)`` over one such buffer, counted as bytes read + written: the access
  pattern of an optimizer step (every line written was just read), hence its roofline.

All contenders step the same param and grad tensors (each keeps its own moments) and are timed
interleaved round-robin (tests/bench/common.time_fns), so they see the same machine state; the
figures are medians. Bytes moved per step: param, exp_avg, exp_avg_sq read and written and grad
read, 28 B per element, + 2 B for the bf16 copy (torch_fused_bf16_copy is counted with the same
30 B, though its second pass moves 6 B more). Reported: the ratios torch_fused / ours,
torch_foreach / ours and torch_fused_bf16_copy / ours_bf16_copy, and each contender's achieved
bandwidth as a fraction of the copy's and of the in-place pass's.

Before timing, every contender takes the same 3 steps from one state (min(N, 1M) elements), and
the maximum absolute difference of its param from ours is recorded (they compute the same update).
"""

import torch

import m6_engine.ops as ops
from tests.bench.common import gbps, print_table, quick_main, time_fns, write_json

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
BYTES_PER_ELEMENT = 28     # p, m, v read + written, g read (fp32)
BF16_COPY_BYTES = 2        # the bf16 copy, written
CONTENDERS = ("ours", "ours_bf16_copy", "torch_fused", "torch_fused_bf16_copy", "torch_foreach")
_COPY_MAX_NUMEL = 64 * 2 ** 20   # 256 MiB per reference buffer: far beyond the caches
_CHECK_MAX_NUMEL = 2 ** 20
_CHECK_STEPS = 3


def _pin(t: torch.Tensor) -> torch.Tensor:
    """``t`` in pinned memory where CUDA is available (as offload would use it), else ``t``."""
    return t.pin_memory() if torch.cuda.is_available() else t


class _Ours:
    """m6::adamw_step_ over (param, grad) with its own moments, counting its steps."""

    def __init__(self, param, grad, param_copy=None):
        self.param, self.grad, self.param_copy = param, grad, param_copy
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        self.steps = 0

    def step(self):
        self.steps += 1
        ops.adamw_step_(self.param, self.exp_avg, self.exp_avg_sq, self.grad, lr=LR, betas=BETAS, eps=EPS,
                        weight_decay=WEIGHT_DECAY, step=self.steps, param_copy=self.param_copy)


def _make_step(name: str, param, grad, copy):
    """The step function of contender ``name`` over (param, grad) with its own moments (torch's are
    allocated at its first step, where an unsupported kind raises)."""
    if name.startswith("ours"):
        return _Ours(param, grad, copy if name == "ours_bf16_copy" else None).step
    param.grad = grad
    kind = "fused" if name.startswith("torch_fused") else "foreach"
    optimizer = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **{kind: True})
    if not name.endswith("_bf16_copy"):
        return optimizer.step

    def step_and_copy():
        optimizer.step()
        copy.copy_(param)

    return step_and_copy


def _contenders(param, grad, copy):
    """name -> step function (or the error string of a contender that cannot run), on shared tensors."""
    steps = {}
    for name in CONTENDERS:
        try:
            step = _make_step(name, param, grad, copy)
            step()   # torch allocates its moments here, and raises if the kind is not supported
            steps[name] = step
        except (RuntimeError, ValueError) as error:
            steps[name] = f"{type(error).__name__}: {error}"
    return steps


def _same_update(numel: int) -> dict:
    """Each contender's _CHECK_STEPS steps from one state: max |param - ours' param|, and whether each
    bf16 copy is exactly its param cast to bf16."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(numel, generator=gen)
    grads = [torch.randn(numel, generator=gen) for _ in range(_CHECK_STEPS)]
    params, copies = {}, {}
    for name in CONTENDERS:
        param, grad = start.clone().requires_grad_(), torch.empty(numel)
        copy = torch.empty(numel, dtype=torch.bfloat16)
        try:
            step = _make_step(name, param, grad, copy)
            for g in grads:
                grad.copy_(g)
                step()
        except (RuntimeError, ValueError):
            continue   # recorded by the timing's _contenders
        params[name] = param.detach()
        if name.endswith("_bf16_copy"):
            copies[name] = bool(torch.equal(copy, params[name].to(torch.bfloat16)))
    ours = params["ours"]
    return {"numel": numel, "steps": _CHECK_STEPS,
            "max_abs_diff_vs_ours": {n: (p - ours).abs().max().item() for n, p in params.items() if n != "ours"},
            "bf16_copy_equals_param_cast": copies}


def _bytes_per_step(name: str, numel: int) -> int:
    return numel * (BYTES_PER_ELEMENT + (BF16_COPY_BYTES if name.endswith("_bf16_copy") else 0))


def run(out_dir: str = "bench-results", quick: bool = False) -> dict:
    """Time the contenders and the copy; print the table, write and return the JSON."""
    ops.require_extension()
    numel = 2 * 2 ** 20 if quick else 100_000_000
    same_update = _same_update(min(numel, _CHECK_MAX_NUMEL))
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(numel, generator=gen).requires_grad_()
    grad = torch.randn(numel, generator=gen)
    copy = _pin(torch.empty(numel, dtype=torch.bfloat16))
    steps = _contenders(param, grad, copy)
    errors = {name: s for name, s in steps.items() if isinstance(s, str)}
    fns = {name: s for name, s in steps.items() if not isinstance(s, str)}
    ref_numel = min(numel, _COPY_MAX_NUMEL)
    src, dst = torch.randn(ref_numel, generator=gen), torch.empty(ref_numel)
    fns["copy"] = lambda: dst.copy_(src)
    fns["inplace"] = lambda: src.mul_(1.0)
    with torch.no_grad():
        seconds = time_fns(fns, "cpu", warmup=1, iters=3 if quick else 9)
    copy_gbps = gbps(2 * 4 * ref_numel, seconds.pop("copy"))
    inplace_gbps = gbps(2 * 4 * ref_numel, seconds.pop("inplace"))
    achieved = {name: gbps(_bytes_per_step(name, numel), s) for name, s in seconds.items()}

    def ratio(slow, fast):
        return seconds[slow] / seconds[fast] if slow in seconds and fast in seconds else None

    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "cpu_capability": ops.cpu_capability(),
        "numel": numel, "param_copy_pinned": copy.is_pinned(), "step_s": seconds, "errors": errors,
        "bytes_per_step": {name: _bytes_per_step(name, numel) for name in seconds},
        "reference_numel": ref_numel, "copy_gbps": copy_gbps, "inplace_gbps": inplace_gbps,
        "achieved_gbps": achieved,
        "fraction_of_copy_bandwidth": {name: bw / copy_gbps for name, bw in achieved.items()},
        "fraction_of_inplace_bandwidth": {name: bw / inplace_gbps for name, bw in achieved.items()},
        "torch_fused_over_ours": ratio("torch_fused", "ours"),
        "torch_foreach_over_ours": ratio("torch_foreach", "ours"),
        "torch_fused_bf16_copy_over_ours_bf16_copy": ratio("torch_fused_bf16_copy", "ours_bf16_copy"),
        "ours_bf16_copy_over_ours": ratio("ours_bf16_copy", "ours"),
        "same_update": same_update,
    }
    _print(result)
    write_json(out_dir, "bench_cpu_adamw", result)
    return result


def _print(r: dict) -> None:
    rows = [[name, f"{s * 1e3:.1f}", f"{r['achieved_gbps'][name]:.1f}",
             f"{r['fraction_of_copy_bandwidth'][name]:.2f}", f"{r['fraction_of_inplace_bandwidth'][name]:.2f}",
             f"{s / r['step_s']['ours']:.2f}", f"{r['same_update']['max_abs_diff_vs_ours'].get(name, 0.0):.1e}"]
            for name, s in r["step_s"].items()]
    rows += [[name, error, "", "", "", "", ""] for name, error in r["errors"].items()]
    print_table(f"AdamW step of {r['numel'] / 1e6:.0f}M fp32 parameters on the CPU ({r['threads']} threads, "
                f"{r['cpu_capability']}): median ms; bandwidth of copy_ {r['copy_gbps']:.1f} GB/s, of an in-place "
                f"mul_ {r['inplace_gbps']:.1f} GB/s (read + write)",
                ["contender", "ms", "GB/s", "of copy", "of in-place", "time / ours", "max |p - ours|"], rows)


def main(argv=None):
    quick_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
