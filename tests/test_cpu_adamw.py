"""m6::adamw_step_ (the fused CPU AdamW update) against the float64 reference and torch's AdamW.

Three-way rule (docs/conventions.md): after several steps, the kernel's error against the float64
reference may not exceed twice the error of the same reference run in float32, plus a small floor.
Against torch.optim.AdamW(foreach=True) the kernel rounds op by op as torch does, except for
torch.sqrt, which is not correctly rounded on the CPU: p may differ by an ulp or two.
"""

import pytest
import torch

import m6_engine.ops as ops
from m6_engine.ops import _extension

SIZES = [1, 7, 15, 16, 17, 1000, 100003]
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
STEPS = 4
FLOOR = 1e-6  # relative error floor (times the largest magnitude of the compared tensor)


def _state(n, seed=0, dtype=torch.float32):
    """(param, exp_avg, exp_avg_sq) after some history, and STEPS gradients, all of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen)
    exp_avg = 0.1 * torch.randn(n, generator=gen)
    exp_avg_sq = 0.01 * torch.rand(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(STEPS)]
    return [t.to(dtype) for t in (param, exp_avg, exp_avg_sq)], [g.to(dtype) for g in grads]


def _run(step_fn, state, grads, first_step=3, **kwargs):
    """STEPS updates of clones of ``state`` with ``step_fn``; returns the final (param, m, v)."""
    p, m, v = (t.clone() for t in state)
    for k, g in enumerate(grads):
        step_fn(p, m, v, g, lr=LR, betas=BETAS, eps=EPS, step=first_step + k, **kwargs)
    return p, m, v


def _torch_adamw(state, grads, first_step=3, weight_decay=0.0, grad_scale=1.0, betas=BETAS):
    """The same updates with torch.optim.AdamW(foreach=True), fed grad * grad_scale in fp32."""
    p, m, v = (t.clone() for t in state)
    p.requires_grad_()
    opt = torch.optim.AdamW([p], lr=LR, betas=betas, eps=EPS, weight_decay=weight_decay, foreach=True)
    opt.state[p] = {"step": torch.tensor(float(first_step - 1)), "exp_avg": m, "exp_avg_sq": v}
    for g in grads:
        p.grad = g * grad_scale
        opt.step()
    return p.detach(), m, v


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_three_way_against_fp64_reference(n, weight_decay, grad_scale):
    state, grads = _state(n)
    kw = dict(weight_decay=weight_decay, grad_scale=grad_scale)
    kernel = _run(ops.adamw_step_, state, grads, **kw)
    composite = _run(ops.adamw_step_reference_, state, grads, **kw)
    exact = _run(ops.adamw_step_reference_, [t.double() for t in state], [g.double() for g in grads], **kw)
    for name, k, c, e in zip(("param", "exp_avg", "exp_avg_sq"), kernel, composite, exact):
        floor = FLOOR * e.abs().max().item()
        err_kernel = (k.double() - e).abs().max().item()
        err_torch = (c.double() - e).abs().max().item()
        assert err_kernel <= 2 * err_torch + floor, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x fp32 composite error {err_torch:.3g} + {floor:.2g}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay,grad_scale,betas", [
    (0.0, 1.0, BETAS), (0.1, 1.0, BETAS), (0.1, 0.37, BETAS),
    (0.01, 2.0, (0.3, 0.9)),  # 1 - beta1 >= 0.5: torch's lerp takes its other form
])
def test_matches_torch_foreach_adamw(n, weight_decay, grad_scale, betas):
    state, grads = _state(n, seed=1)
    ours = _run(lambda *a, **k: ops.adamw_step_(*a, **{**k, "betas": betas}), state, grads,
                weight_decay=weight_decay, grad_scale=grad_scale)
    theirs = _torch_adamw(state, grads, weight_decay=weight_decay, grad_scale=grad_scale, betas=betas)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
        # Observed with torch 2.14: exp_avg and exp_avg_sq bitwise equal in every case; param
        # within 2.4e-7 (2 ulps at |p| ~ 2) in up to 2% of the elements after 4 steps, all from
        # torch.sqrt's rounding. A tolerance, not equality: torch's own roundings are its build's.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 17, 31, 32, 33, 1000, 100003])
def test_param_copy_equals_param_cast(dtype, n):
    state, grads = _state(n, seed=2)
    state[0][: min(n, 5)] *= 1e5  # past fp16's range: the copy must be inf exactly where .to() gives inf
    plain = _run(ops.adamw_step_, state, grads[:1], weight_decay=0.1)
    copy = torch.full((n,), float("nan"), dtype=dtype)
    with_copy = _run(ops.adamw_step_, state, grads[:1], weight_decay=0.1, param_copy=copy)
    for a, b in zip(plain, with_copy):
        assert torch.equal(a, b)  # the copy changes nothing else
    assert torch.equal(copy, with_copy[0].to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1])
def test_large_param_copy(dtype, offset):
    # A copy of 16 MiB or more goes out with non-temporal stores when it is vector-aligned
    # (offset 0), with plain stores otherwise (offset 1: a view one element into its buffer).
    n = 8 * 2 ** 20 + 33
    state, grads = _state(n, seed=4)
    plain = _run(ops.adamw_step_, state, grads[:1], weight_decay=0.1)
    copy = torch.full((n + offset,), float("nan"), dtype=dtype)[offset:]
    with_copy = _run(ops.adamw_step_, state, grads[:1], weight_decay=0.1, param_copy=copy)
    assert torch.equal(plain[0], with_copy[0])
    assert torch.equal(copy, with_copy[0].to(dtype))


def test_results_do_not_depend_on_thread_count():
    state, grads = _state(300_001, seed=3)  # several 32K-element tasks, and a tail
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            copy = torch.empty(300_001, dtype=torch.bfloat16)
            results.append((*_run(ops.adamw_step_, state, grads[:2], weight_decay=0.1, param_copy=copy), copy))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_in_place_and_grad_untouched():
    (p, m, v), (g, *_) = _state(100)
    pointers = [t.data_ptr() for t in (p, m, v, g)]
    g_before = g.clone()
    p_before = p.clone()
    ops.adamw_step_(p, m, v, g, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, step=1, grad_scale=0.5)
    assert [t.data_ptr() for t in (p, m, v, g)] == pointers
    assert torch.equal(g, g_before) and not torch.equal(p, p_before)


def test_param_requiring_grad_and_empty_tensors():
    (p, m, v), (g, *_) = _state(10)
    p.requires_grad_()  # a leaf parameter: updated under no_grad, as optimizers do
    ops.adamw_step_(p, m, v, g, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, step=1)
    empty = [torch.empty(0) for _ in range(4)]
    ops.adamw_step_(*empty, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, step=1, param_copy=torch.empty(0).half())


def _good_args(device="cpu"):
    return dict(param=torch.zeros(8, device=device), exp_avg=torch.zeros(8, device=device),
                exp_avg_sq=torch.zeros(8, device=device), grad=torch.ones(8, device=device), param_copy=None,
                lr=LR, beta1=0.9, beta2=0.999, eps=EPS, weight_decay=0.0, step=1, grad_scale=1.0)


def _call(args):
    a = args
    torch.ops.m6.adamw_step_(a["param"], a["exp_avg"], a["exp_avg_sq"], a["grad"], a["param_copy"], a["lr"],
                             a["beta1"], a["beta2"], a["eps"], a["weight_decay"], a["step"], a["grad_scale"])


def _bad_cases(device):
    strided = lambda: torch.zeros(16, device=device)[::2]  # noqa: E731  (8 elements, stride 2)
    return [
        ("param float64", {"param": torch.zeros(8, device=device, dtype=torch.float64)}, "param must be float32, got"),
        ("exp_avg fp16", {"exp_avg": torch.zeros(8, device=device, dtype=torch.float16)},
         "exp_avg must be float32, got"),
        ("grad of other numel", {"grad": torch.zeros(7, device=device)}, "grad must have param's numel 8, got 7"),
        ("exp_avg_sq of other numel", {"exp_avg_sq": torch.zeros(2, 5, device=device)},
         "exp_avg_sq must have param's numel 8, got 10"),
        ("non-contiguous exp_avg_sq", {"exp_avg_sq": strided()}, "exp_avg_sq must be contiguous"),
        ("non-contiguous param", {"param": strided()}, "param must be contiguous"),
        ("param_copy int32", {"param_copy": torch.zeros(8, device=device, dtype=torch.int32)},
         "param_copy must be float32, float16 or bfloat16, got"),
        ("param_copy of other numel", {"param_copy": torch.zeros(9, device=device, dtype=torch.bfloat16)},
         "param_copy must have param's numel 8, got 9"),
        ("non-contiguous param_copy", {"param_copy": torch.zeros(16, device=device).half()[::2]},
         "param_copy must be contiguous"),
        ("step 0", {"step": 0}, r"step must be >= 1 \(the number of this update\), got 0"),
        ("negative lr", {"lr": -0.5}, "lr must be a finite number >= 0, got -0.5"),
        ("nan lr", {"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
        ("beta1 1", {"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1"),
        ("beta2 negative", {"beta2": -0.25}, r"beta2 must be in \[0, 1\), got -0.25"),
        ("negative eps", {"eps": -0.5}, "eps must be a finite number >= 0, got -0.5"),
        ("negative weight_decay", {"weight_decay": -0.5}, "weight_decay must be a finite number >= 0, got -0.5"),
        ("inf grad_scale", {"grad_scale": float("inf")}, "grad_scale must be a finite number >= 0, got inf"),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])  # the C++ kernel, and the fake kernel
@pytest.mark.parametrize("case", range(len(_bad_cases("cpu"))), ids=[c[0] for c in _bad_cases("cpu")])
def test_bad_argument_raises(device, case):
    _, change, message = _bad_cases(device)[case]
    with pytest.raises(RuntimeError, match=f"adamw_step_: {message}"):
        _call({**_good_args(device), **change})


@pytest.mark.parametrize("name", ["exp_avg", "grad", "param_copy"])
def test_tensor_on_another_device_raises(name):
    # A meta tensor next to CPU ones dispatches to the fake kernel, which checks the devices.
    args = _good_args()
    args[name] = torch.zeros(8, device="meta")
    with pytest.raises(RuntimeError, match=f"adamw_step_: {name} must be on param's device cpu, got meta"):
        _call(args)
    args = {**_good_args("meta"), name: torch.zeros(8)}
    with pytest.raises(RuntimeError, match=f"adamw_step_: {name} must be on param's device meta, got cpu"):
        _call(args)


def test_cuda_tensors_rejected():
    # There is no CUDA kernel; the fake kernel (what torch.compile traces) says so. Fake CUDA
    # tensors need no GPU.
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(RuntimeError, match="adamw_step_: param must be a CPU tensor, got cuda:0"):
            _call(_good_args("cuda"))


def test_meta_tensors():
    _call({**_good_args("meta"), "param_copy": torch.empty(8, device="meta", dtype=torch.bfloat16)})


@pytest.mark.parametrize("copy_dtype", [None, torch.bfloat16])
def test_opcheck(copy_dtype):
    (p, m, v), (g, *_) = _state(100)
    copy = None if copy_dtype is None else torch.empty(100, dtype=copy_dtype)
    torch.library.opcheck(torch.ops.m6.adamw_step_.default, (p, m, v, g, copy, LR, 0.9, 0.999, EPS, 0.1, 3, 0.5))


def test_missing_extension_raises(monkeypatch):
    monkeypatch.setattr(_extension, "_MODULE", None)
    monkeypatch.setattr(_extension, "_LOAD_ERROR", "m6_engine._C is not built (simulated)")
    (p, m, v), (g, *_) = _state(4)
    with pytest.raises(ops.ExtensionNotBuiltError, match=r"not built \(simulated\)"):
        ops.adamw_step_(p, m, v, g, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, step=1)


def test_registered_for_the_cpu_only():
    # The host half of offload: a CPU kernel and a fake kernel, and no CUDA kernel in any build.
    has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key("m6::adamw_step_", key)  # noqa: E731
    assert has("CPU") and has("Meta") and not has("CUDA")
