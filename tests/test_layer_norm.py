"""m6::layer_norm (forward and backward) against the float64 reference, three ways.

Three-way rule (docs/conventions.md): the kernel's error against float64 may not exceed twice the error of
torch.nn.functional.layer_norm run in the same precision, plus a small floor. float64 (CPU only) is
the kernels' exact path: it must match the reference to 1e-12 and pass torch.autograd.gradcheck.
"""

import pytest
import torch
import torch.nn.functional as F

import m6_engine.ops as ops
from tests.conftest import DEVICES, nan_filled_empty

EPS = 1e-5
# Relative error floor per dtype (times the largest magnitude of the compared tensor); float64 is
# held to 1e-12 (the reference is float64 too, so torch's own error is ~1e-16).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """x (..., N) with an offset mean (stresses the variance), weight near 1, small bias."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = 3 * torch.randn(shape, generator=gen) + 5
    w = 1 + 0.5 * torch.randn(n, generator=gen)
    b = 0.5 * torch.randn(n, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def _assert_three_way(kernel, composite, exact, dtype, what):
    floor = FLOOR[dtype] * max(1.0, exact.abs().max().item())
    err_kernel = (kernel.double() - exact).abs().max().item()
    err_torch = (composite.double() - exact).abs().max().item()
    assert err_kernel <= 2 * err_torch + floor, (
        f"{what}: kernel error {err_kernel:.3g} > 2 x torch error {err_torch:.3g} + {floor:.2g}")


def _torch_forward(x, w, b):
    """(y, mean, rstd) of ATen's layer norm, mean and rstd flattened to (rows,)."""
    y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), w, b, EPS)
    return y, mean.reshape(-1), rstd.reshape(-1)


def _grads(fn, tensors, grad_y):
    leaves = [t.detach().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves, grad_y)


def _check(x, w, b, backward=True):
    y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    rows = x.numel() // x.shape[-1]
    assert y.shape == x.shape and y.dtype == x.dtype and mean.shape == rstd.shape == (rows,)
    assert mean.dtype == rstd.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    exact = _torch_forward(x.double(), w.double(), b.double())
    composite = _torch_forward(x, w, b)
    for name, k, c, e in zip(("y", "mean", "rstd"), (y, mean, rstd), composite, exact):
        _assert_three_way(k, c, e, x.dtype, name)
    if not backward:
        return
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    kernel = _grads(lambda *t: ops.layer_norm(*t, eps=EPS), (x, w, b), grad_y)
    layer_norm = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)  # noqa: E731
    composite = _grads(layer_norm, (x, w, b), grad_y)
    exact = _grads(layer_norm, (x.double(), w.double(), b.double()), grad_y.double())
    for name, k, c, e in zip(("grad_x", "grad_weight", "grad_bias"), kernel, composite, exact):
        assert k.dtype == x.dtype and k.shape == e.shape
        _assert_three_way(k, c, e, x.dtype, name)


@pytest.mark.parametrize("rows,hidden", [(9, 1), (50, 7), (33, 1024), (3, 65536)])
def test_fp32(rows, hidden):
    _check(*_inputs((rows, hidden)))


def test_many_rows_and_leading_dims():
    # (2, 261, 96): more rows than gradient chunks, so chunks hold several rows.
    _check(*_inputs((2, 261, 96)))


def test_row_whose_start_is_far_from_its_mean():
    # The first 64 elements (the kernel's variance pivot) sit 32 standard deviations from the
    # row's mean: the shifted sums lose ~1000x precision there, so the kernel must redo the
    # variance around the exact mean (and stay within the three-way bound).
    x, w, b = _inputs((2, 65536))
    x = 1 + 1e-3 * (x - 5)
    x[:, :64] = 0
    _check(x, w, b, backward=False)


def test_hidden_one_gives_bias():
    x, w, b = _inputs((6, 1))
    y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    assert torch.equal(y, b.expand_as(y)) and torch.equal(mean, x[:, 0])
    torch.testing.assert_close(rstd, torch.full_like(rstd, EPS ** -0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous(layout, dtype):
    x, w, b = _inputs((40, 130), dtype)
    wide = torch.stack([x, torch.zeros_like(x)], dim=-1).view(40, 260)    # x in the even columns
    x = x.t().contiguous().t() if layout == "transposed" else wide[:, ::2]  # (40, 130) either way
    assert not x.is_contiguous()
    _check(x, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(17, 7), (9, 1024), (2, 4100)])
def test_half_precision(dtype, rows, hidden):
    _check(*_inputs((rows, hidden), dtype))


@pytest.mark.parametrize("shape", [(9, 1), (50, 7), (2, 261, 96), (3, 65536)])
def test_fp64_matches_reference(shape):
    # (2, 261, 96): several rows per weight-gradient chunk; (3, 65536): the widest rows.
    _check(*_inputs(shape, torch.float64))



def test_weight_grads_are_deterministic_across_thread_counts():
    # The row chunks of the weight/bias reduction depend on the shape only, not on the threads.
    x, w, b = _inputs((300, 520))
    grad_y = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(lambda *t: ops.layer_norm(*t), (x, w, b), grad_y))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_every_element_written(device):
    # With deterministic fill every at::empty (the kernels' outputs included) starts as NaN.
    x, w, b = _inputs((70, 1000), device=device)
    with nan_filled_empty():
        assert torch.empty(16, device=device).isnan().all(), "poisoning is not active"
        y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
        grads = torch.ops.m6.layer_norm_backward(torch.ones_like(x), x, w, mean, rstd)
    for t in (y, mean, rstd, *grads):
        assert not t.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_matches_cpu(device):
    # The CUDA kernel against the CPU kernel; runs on a GPU only where one is present.
    x, w, b = _inputs((40, 1000), torch.bfloat16 if device == "cuda" else torch.float32)
    out = torch.ops.m6.layer_norm(x.to(device), w.to(device), b.to(device), EPS)
    ref = torch.ops.m6.layer_norm(x, w, b, EPS)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a.cpu().float(), c.float(), atol=FLOOR[x.dtype] * 8, rtol=FLOOR[x.dtype])


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5), (3, 1), (2, 17)])
@pytest.mark.parametrize("wrt", ["x, weight, bias", "x only", "weight and bias only"])
def test_gradcheck_fp64(shape, wrt):
    # gradcheck at its default (float64) step and tolerances, differentiating with respect to all
    # inputs or a subset (the others held constant). (3, 1): zero variance, y = bias.
    x, w, b = _inputs(shape, torch.float64)
    x.requires_grad_(wrt != "weight and bias only")
    w.requires_grad_(wrt != "x only")
    b.requires_grad_(wrt != "x only")
    fn = lambda x, w, b: ops.layer_norm(x, w, b, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_double_backward_raises():
    x, w, b = (t.requires_grad_() for t in _inputs((4, 6), torch.float64))
    y = ops.layer_norm(x, w, b, EPS)
    grads = torch.autograd.grad(y, (x, w), torch.randn_like(y), create_graph=True)
    with pytest.raises(RuntimeError, match="layer_norm: double backward is not supported"):
        sum(g.sum() for g in grads).backward()


def test_meta_and_fake_tensors():
    x, w, b = (torch.empty(s, dtype=torch.bfloat16, device="meta") for s in ((2, 3, 8), (8,), (8,)))
    y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"
    assert mean.shape == rstd.shape == (6,) and mean.dtype == torch.float32
    grads = torch.ops.m6.layer_norm_backward(y, x, w, mean, rstd)
    assert [g.shape for g in grads] == [x.shape, w.shape, w.shape]
    _, mean, rstd = torch.ops.m6.layer_norm(x.double(), w.double(), b.double(), EPS)
    assert mean.dtype == rstd.dtype == torch.float64


def test_fake_cuda_rejects_fp64():
    # The CUDA kernels compute in fp32 and reject float64; the fake kernel must agree (fake CUDA
    # tensors need no GPU), naming the dtype.
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x, w, b = (torch.empty(s, dtype=torch.float64, device="cuda") for s in ((2, 8), (8,), (8,)))
        assert torch.ops.m6.layer_norm(x.float(), w.float(), b.float(), EPS)[1].dtype == torch.float32
        with pytest.raises(RuntimeError, match=r"float16 or bfloat16 \(float64 is CPU-only\), got torch.float64"):
            torch.ops.m6.layer_norm(x, w, b, EPS)


def test_torch_compile_fullgraph():
    def block(x, w, b):
        return ops.layer_norm(x * 2, w, b, EPS).relu()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, w, b = _inputs((5, 64))
    grad_y = torch.randn_like(x)
    torch.testing.assert_close(compiled(x, w, b), block(x, w, b), atol=0, rtol=0)
    for a, c in zip(_grads(compiled, (x, w, b), grad_y), _grads(block, (x, w, b), grad_y)):
        torch.testing.assert_close(a, c, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, w, b = (t.requires_grad_() for t in _inputs((3, 5, 16), dtype))
    torch.library.opcheck(torch.ops.m6.layer_norm.default, (x, w, b, EPS))
    _, mean, rstd = torch.ops.m6.layer_norm(x.detach(), w.detach(), b.detach(), EPS)
    torch.library.opcheck(torch.ops.m6.layer_norm_backward.default,
                          (torch.randn_like(x), x.detach(), w.detach(), mean, rstd))


def _bad_inputs():
    """(name, (x, weight, bias), expected message) for each bad input of the forward."""
    x, w, b = _inputs((3, 8))
    return [
        ("int x", (x.int(), w.int(), b.int()), "x must be float32, float64, float16 or bfloat16, got Int"),
        ("weight of another dtype", (x.double(), w, b.double()), "weight must have x's dtype Double, got Float"),
        ("0-d x", (x[0, 0], w[:1], b[:1]), "x must have at least one dim"),
        ("hidden 0", (x[:, :0], w[:0], b[:0]), r"hidden size \(x's last dim\) must be in \[1, 65536\], got 0"),
        ("hidden 65537", (torch.zeros(1, 65537), torch.ones(65537), torch.zeros(65537)),
         r"must be in \[1, 65536\], got 65537"),
        ("weight of wrong shape", (x, w[:7], b), r"weight must have shape \(8,\)"),
        ("2-D bias", (x, w, b.view(2, 4)), r"bias must have shape \(8,\)"),
        ("bias of another dtype", (x, w, b.half()), "bias must have x's dtype"),
        ("weight on another device", (x, w.to("meta"), b), "weight must be on x's device"),
        ("x on another device", (x.to("meta"), w, b), "weight must be on x's device"),
    ]


@pytest.mark.parametrize("name,args,message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.layer_norm(*args)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
@pytest.mark.parametrize("device", ["cpu", "meta"])   # the kernel, and the fake kernel (compile, meta)
def test_bad_eps_raises(eps, device):
    x, w, b = (t.to(device) for t in _inputs((3, 8)))
    with pytest.raises(RuntimeError, match=rf"layer_norm: eps must be a finite number >= 0, got {eps}"):
        ops.layer_norm(x, w, b, eps)
    ops.layer_norm(x, w, b, 0.0)   # zero is allowed (rows are then only safe when not constant)


def test_bad_backward_input_raises():
    x, w, b = _inputs((3, 8))
    y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    backward = torch.ops.m6.layer_norm_backward
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        backward(y[:2], x, w, mean, rstd)
    with pytest.raises(RuntimeError, match="grad_y must have x's dtype"):
        backward(y.half(), x, w, mean, rstd)
    with pytest.raises(RuntimeError, match=r"mean must have shape \(3,\)"):
        backward(y, x, w, mean[:2], rstd)
    with pytest.raises(RuntimeError, match="rstd must be float32"):
        backward(y, x, w, mean, rstd.double())
    x, w, y = x.double(), w.double(), y.double()
    with pytest.raises(RuntimeError, match="mean must be float64 for x of dtype Double, got Float"):
        backward(y, x, w, mean, rstd.double())
