"""The CUDA kernels of m6::masked_softmax and m6::layer_norm, and their edge cases on both devices.

Each kernel is compared three ways (docs/conventions.md): against the float64 reference, against the
same-precision PyTorch composite (the kernel's error may be at most twice PyTorch's plus a small
floor), and, in fp32, against the CPU kernel. The cases cover every CUDA path of each op
(csrc/masked_softmax/masked_softmax_cuda.cu). Rows move in 16-byte chunks of VEC keys (4 fp32, 8
16-bit) aligned in memory: when Sk is not a multiple of VEC a row spans up to ceil((Sk + VEC - 1) / VEC)
chunks, its first and last partial; scalar access (VEC = 1) only when the tensors of a call sit at
different offsets from a 16-byte boundary. By chunks per row:
  forward:  one warp per row in registers up to 256 fp32 / 128 16-bit chunks (1024 keys), up to 4
            warps per row in 128-thread blocks up to 4096 keys, one block of up to 1024 threads per
            row up to 16384 keys (8192 scalar), the row staged in shared memory up to the device's
            per-block limit (58080 fp32 keys on H100/H200, 41728 on A100), the streaming block path
            beyond;
  backward: one warp per row up to 256 chunks (1024 fp32 / 2048 16-bit keys, 256 scalar), a block beyond.
Tests marked `cuda` run only where a GPU and m6_engine._C built with its CUDA kernels are present
(`make gpu-check` runs them). The edge cases of the later sections (non-finite scores, fully masked
rows, 64-bit offsets, grid-stride launches, decode shapes, layouts, bitwise determinism) are
parametrized over tests.conftest.DEVICES: their CPU variants (fp32, small) run everywhere, so the
test logic is exercised on the CPU kernels; the CUDA variants add fp16 and bf16. The tests of more
than 2^31 elements ("huge" in their names, -k huge) are CUDA only and skip without the free memory.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import m6_engine.ops as ops
from m6_engine.ops.masked_softmax import q_offset_tensor
from m6_engine.ops.reference import masked_softmax_backward_reference, masked_softmax_reference, prefix_lm_mask
from tests.conftest import DEVICES, nan_filled_empty
from tests.test_layer_norm import EPS
from tests.test_layer_norm import _assert_three_way as _ln_assert_three_way
from tests.test_layer_norm import _check as _check_layer_norm
from tests.test_layer_norm import _grads as _ln_grads
from tests.test_layer_norm import _inputs as _ln_inputs
from tests.test_layer_norm import _torch_forward as _ln_torch_forward
from tests.test_masked_softmax import (
    CASES, FLOOR, SCALE, _assert_masked_zero, _assert_three_way, _check_backward, _check_forward, _composite,
    _grads, _lengths, _mixed_lengths, _scores)

CUDA = "cuda"
HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, *HALF_DTYPES]
# The error of a float64 input on CUDA (csrc/common/dtypes.h), as a pattern.
NO_FP64 = r"float32, float16 or bfloat16 \(float64 is CPU-only\), got Double"
# Sk on both sides of each path switch (see the module docstring): with Sk a multiple of VEC, and
# not (one chunk more per row), so partial chunks meet every path. 65536 fp32 / 65544 16-bit keys
# (256 / 128 KiB staged) pass every device's shared-memory limit: the streaming path.
PATH_EDGES = {torch.float32: [1021, 1022, 1024, 1028, 4093, 4094, 4096, 4100, 16381, 16382, 16384, 16388,
                              32772, 65536],
              torch.float16: [1017, 1018, 1024, 1032, 2041, 2042, 2048, 2056, 4089, 4090, 4096, 4104, 16377,
                              16378, 16384, 16392, 32776, 65544],
              torch.bfloat16: [1017, 1018, 1024, 1032, 2041, 2042, 2048, 2056, 4089, 4090, 4096, 4104, 16377,
                               16378, 16384, 16392, 32776, 65544]}


def _on_cuda(*tensors):
    return [t.to(CUDA) for t in tensors]


# ---- masked_softmax: numerics.

@pytest.mark.parametrize("sq,sk,q_offset", CASES)
@pytest.mark.parametrize("length_dtype", [torch.int64, torch.int32])
@pytest.mark.cuda
def test_softmax_forward_fp32_and_cpu_kernel(sq, sk, q_offset, length_dtype):
    prefix, valid = _lengths(_mixed_lengths(sk), length_dtype)
    scores = _scores(len(prefix), 2, sq, sk)
    out = _check_forward(*_on_cuda(scores, prefix, valid), q_offset)
    cpu = ops.masked_softmax(scores, prefix, valid, SCALE, q_offset)
    torch.testing.assert_close(out.cpu(), cpu, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("sq,sk,q_offset", CASES)
@pytest.mark.cuda
def test_softmax_backward_fp32_and_cpu_kernel(sq, sk, q_offset):
    prefix, valid = _lengths(_mixed_lengths(sk))
    scores = _scores(len(prefix), 2, sq, sk)
    _check_backward(*_on_cuda(scores, prefix, valid), q_offset)
    y = ops.masked_softmax(scores, prefix, valid, SCALE, q_offset)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    offsets = q_offset_tensor(q_offset, y)
    cpu = torch.ops.m6.masked_softmax_backward(dy, y, prefix, valid, SCALE, offsets)
    gpu = torch.ops.m6.masked_softmax_backward(*_on_cuda(dy, y, prefix, valid), SCALE, offsets.to(CUDA))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("at_end", [False, True], ids=["q_offset 0", "last rows"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.cuda
def test_softmax_path_edges(dtype, at_end):
    # 7 rows per sample: 35 rows, odd, so multi-row blocks also end with a row past the last.
    for sk in PATH_EDGES[dtype]:
        prefix, valid = _lengths(_mixed_lengths(sk), device=CUDA)
        scores = _scores(len(prefix), 1, 7, sk, dtype, device=CUDA)
        q_offset = sk - 7 if at_end else 0  # the last rows: causal rows of every length class
        _check_forward(scores, prefix, valid, q_offset)
        _check_backward(scores, prefix, valid, q_offset)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("sq,sk,q_offset", [(17, 17, 0), (8, 528, 520), (5, 1000, 0), (24, 4097, 4073),
                                            (3, 3, 0), (1, 1, 0), (7, 17, 10)])
@pytest.mark.cuda
def test_softmax_half_precision(dtype, sq, sk, q_offset):
    prefix, valid = _lengths(_mixed_lengths(sk), device=CUDA)
    scores = _scores(len(prefix), 2, sq, sk, dtype, device=CUDA)
    _check_forward(scores, prefix, valid, q_offset)
    _check_backward(scores, prefix, valid, q_offset)


@pytest.mark.parametrize("sk", [8192, 32768, 32771, 65536])  # registers, shared memory (x2), streaming
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.cuda
def test_softmax_long_rows(dtype, sk):
    sq = 4
    q_offset = sk - sq  # the last rows: the longest causal rows
    # Sample 1 ends 2 keys early: its rows 2 and 3 are padding; sample 3 is all padding.
    prefix, valid = _lengths([(0, sk), (sk // 2, sk - 2), (sk, sk), (0, 0)], device=CUDA)
    scores = _scores(4, 2, sq, sk, dtype, device=CUDA)
    out = _check_forward(scores, prefix, valid, q_offset, poison=True)
    assert torch.all(out[1, :, 2:] == 0) and torch.all(out[3] == 0)  # padded rows
    _check_backward(scores, prefix, valid, q_offset, poison=True)


@pytest.mark.cuda
def test_softmax_many_rows_and_heads():
    # Several rows per warp-path block and more rows than blocks in flight; a mix of samples.
    prefix, valid = _lengths([(0, 528), (272, 528), (144, 400), (528, 528)] * 4, torch.int32, CUDA)
    scores = _scores(16, 16, 128, 528, torch.bfloat16, device=CUDA)
    _check_forward(scores, prefix, valid, 400)


@pytest.mark.parametrize("layout", ["transposed", "strided", "misaligned"])
@pytest.mark.parametrize("sk", [17, 528, 4104])
@pytest.mark.cuda
def test_softmax_non_contiguous_and_misaligned(layout, sk):
    prefix, valid = _lengths(_mixed_lengths(sk), device=CUDA)
    if layout == "misaligned":  # contiguous, but 4 bytes past a 16-byte boundary: scalar access
        flat = _scores(1, 1, 1, 5 * 2 * 8 * sk + 1, device=CUDA).flatten()
        scores = flat[1:].view(5, 2, 8, sk)
        assert scores.is_contiguous() and scores.data_ptr() % 16 != 0
    else:
        scores = (_scores(5, 2, 8, 2 * sk, device=CUDA)[..., ::2] if layout == "strided"
                  else _scores(5, 2, sk, 8, device=CUDA).transpose(2, 3))  # (5, 2, 8, Sk)
        assert not scores.is_contiguous()
    q_offset = max(0, sk - 8)
    _check_forward(scores, prefix, valid, q_offset)
    _check_backward(scores, prefix, valid, q_offset)


@pytest.mark.cuda
def test_softmax_extreme_scores_and_scales():
    prefix, valid = _lengths(_mixed_lengths(600), device=CUDA)
    scores = 50 * _scores(5, 1, 40, 600, device=CUDA)
    for scale in (1.0, -0.5, 0.0):
        _check_forward(scores, prefix, valid, 560, scale)
    # A huge q_offset: every row is past valid_len, so everything is padding; 2^63 - 1 would
    # overflow q_offset + i without the kernels' clamp.
    for huge in (2**40, 2**63 - 1):
        out = ops.masked_softmax(scores, prefix, valid, 1.0, huge)
        assert torch.all(out == 0)


@pytest.mark.cuda
def test_softmax_every_element_written():
    # Outputs allocated NaN-filled: a position a kernel forgets to write stays NaN. Both paths.
    for sk in (70, 528, 4097):
        prefix, valid = _lengths(_mixed_lengths(sk), device=CUDA)
        scores = _scores(5, 2, 9, sk, torch.bfloat16, device=CUDA)
        _check_forward(scores, prefix, valid, sk - 9, poison=True)
        _check_backward(scores, prefix, valid, sk - 9, poison=True)


# ---- masked_softmax: the CUDA contract (stream, device, graphs, no host sync, bad values).

@pytest.mark.cuda
def test_softmax_runs_on_the_callers_stream_and_in_a_cuda_graph():
    # Capture fails if the op synchronises with the host (e.g. copies the lengths back): the fast
    # path must not. Replaying the graph on new scores must give the eager result.
    prefix, valid = _lengths(_mixed_lengths(528), torch.int32, CUDA)
    scores = _scores(5, 2, 16, 528, torch.bfloat16, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = ops.masked_softmax(scores, prefix, valid, SCALE, 512)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.masked_softmax(scores, prefix, valid, SCALE, 512)
    scores.copy_(_scores(5, 2, 16, 528, torch.bfloat16, device=CUDA, seed=7))
    graph.replay()
    torch.cuda.synchronize()
    expected = ops.masked_softmax(scores, prefix, valid, SCALE, 512)
    torch.testing.assert_close(captured, expected, atol=0, rtol=0)
    assert not torch.equal(warm, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.cuda
def test_softmax_and_layer_norm_on_a_second_gpu():
    # The CUDA guard: tensors on cuda:1 while cuda:0 is current.
    prefix, valid = _lengths(_mixed_lengths(64), device="cuda:1")
    scores = _scores(5, 2, 64, 64, device="cuda:1")
    _check_forward(scores, prefix, valid, 0)
    _check_layer_norm(*_ln_inputs((33, 256), torch.float32, "cuda:1"))


_BAD_LENGTHS_SCRIPT = """
import sys, torch
import m6_engine.ops as ops
prefix, valid, q_offset = (torch.tensor(v, device="cuda", dtype=torch.int64) for v in ({prefix}, {valid}, {q_offset}))
scores = torch.randn(2, 2, 3, 8, device="cuda")
out = {call}
torch.cuda.synchronize()
print("NO ERROR")
"""


@pytest.mark.parametrize("op,prefix,valid,q_offset", [
    ("forward", [4, 0], [3, 3], [0, 0]), ("forward", [0, 0], [9, 3], [0, 0]), ("forward", [-1, 0], [3, 3], [0, 0]),
    ("forward", [0, -2], [0, -1], [0, 0]), ("forward", [0, 0], [3, 3], [0, -1]),
    ("backward", [0, 0], [3, 9], [0, 0]), ("backward", [0, 0], [3, 3], [-5, 0])],
    ids=["prefix>valid", "valid>Sk", "negative prefix", "negative valid", "negative q_offset",
         "backward valid>Sk", "backward negative q_offset"])
@pytest.mark.cuda
def test_softmax_bad_length_values_raise(op, prefix, valid, q_offset):
    # Length and offset values are not copied to the host on CUDA: they are clamped for memory
    # safety and checked by an asynchronous device assert, which fails at the next synchronisation
    # and leaves the CUDA context unusable, hence a subprocess.
    call = ("ops.masked_softmax(scores, prefix, valid, 1.0, q_offset)" if op == "forward" else
            "torch.ops.m6.masked_softmax_backward(scores, scores, prefix, valid, 1.0, q_offset)")
    script = _BAD_LENGTHS_SCRIPT.format(prefix=prefix, valid=valid, q_offset=q_offset, call=call)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "NO ERROR" not in output, output[-2000:]
    assert "device-side assert" in output or "masked_softmax: lengths or q_offset out of range" in output, \
        output[-2000:]


@pytest.mark.cuda
def test_softmax_good_edge_lengths_do_not_assert():
    # The edges of the valid range: prefix == valid == Sk, prefix == valid == 0, q_offset 0 and
    # far past valid_len.
    prefix, valid = _lengths([(8, 8), (0, 0), (0, 8), (3, 3)], device=CUDA)
    scores = _scores(4, 2, 3, 8, device=CUDA)
    _check_forward(scores, prefix, valid, 5)
    _check_forward(scores, prefix, valid, torch.tensor([0, 2**63 - 1, 7, 2], device=CUDA))
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_softmax_bad_inputs_raise_on_cuda():
    x = _scores(2, 1, 3, 4, device=CUDA)
    p, v = _lengths([(1, 4), (0, 3)], device=CUDA)
    # float64 is the CPU kernels' exact path; the CUDA kernels compute in fp32 and refuse it.
    with pytest.raises(RuntimeError, match="scores must be " + NO_FP64):
        ops.masked_softmax(x.double(), p, v)
    zero = q_offset_tensor(0, x)
    with pytest.raises(RuntimeError, match="out must be " + NO_FP64):
        torch.ops.m6.masked_softmax_backward(x.double(), x.double(), p, v, 1.0, zero)
    with pytest.raises(RuntimeError, match=r"scores must be 4-D \(B, H, Sq, Sk\), got 3-D"):
        ops.masked_softmax(x[0], p, v)
    with pytest.raises(RuntimeError, match="valid_len must be on scores's device"):
        ops.masked_softmax(x, p, v.cpu())
    with pytest.raises(RuntimeError, match=r"prefix_len must have shape \(B,\)"):
        ops.masked_softmax(x, p[:1], v)
    with pytest.raises(RuntimeError, match="q_offset must be on scores's device"):
        ops.masked_softmax(x, p, v, 1.0, zero.cpu())
    with pytest.raises(RuntimeError, match=r"q_offset must have shape \(B,\)"):
        ops.masked_softmax(x, p, v, 1.0, zero[:1])
    with pytest.raises(RuntimeError, match="q_offset must be int32 or int64"):
        ops.masked_softmax(x, p, v, 1.0, zero.float())
    out = ops.masked_softmax(x, p, v)
    with pytest.raises(RuntimeError, match="grad_out must have out's dtype"):
        torch.ops.m6.masked_softmax_backward(out.half(), out, p, v, 1.0, zero)
    with pytest.raises(RuntimeError, match="grad_out must have out's shape"):
        torch.ops.m6.masked_softmax_backward(out[..., :3], out, p, v, 1.0, zero)


@pytest.mark.cuda
def test_softmax_opcheck_and_compile_on_cuda():
    prefix, valid = _lengths([(1, 4), (0, 3), (0, 0)], torch.int32, CUDA)
    q_offset = torch.tensor([1, 0, 2], dtype=torch.int32, device=CUDA)
    scores = _scores(3, 2, 5, 4, device=CUDA).requires_grad_()
    torch.library.opcheck(torch.ops.m6.masked_softmax.default, (scores, prefix, valid, 0.5, q_offset))
    out = ops.masked_softmax(scores.detach(), prefix, valid, 0.5, q_offset)
    torch.library.opcheck(torch.ops.m6.masked_softmax_backward.default,
                          (torch.randn_like(out), out, prefix, valid, 0.5, q_offset))
    fn = lambda x: ops.masked_softmax(x * 2, prefix, valid, SCALE, q_offset) * 3  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(scores.detach()), fn(scores.detach()), atol=0, rtol=0)


# ---- layer_norm (the three-way check of y, mean, rstd and the gradients is tests/test_layer_norm's).

HIDDEN = [1, 3, 17, 1024, 4097, 4104, 65536]


@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.cuda
def test_layer_norm_forward_backward(n, dtype):
    rows = max(2, min(301, 2**21 // n))  # odd where small: a partial last block of rows
    _check_layer_norm(*_ln_inputs((rows, n), dtype, CUDA))


@pytest.mark.cuda
def test_layer_norm_leading_dims_and_many_rows():
    _check_layer_norm(*_ln_inputs((4, 1000, 1024), torch.bfloat16, CUDA, seed=1))


@pytest.mark.parametrize("n", [17, 1024, 65536])
@pytest.mark.cuda
def test_layer_norm_matches_cpu_kernel_fp32(n):
    x, w, b = _ln_inputs((7, n), torch.float32, CUDA, seed=4)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x)
    gpu = torch.ops.m6.layer_norm(x, w, b, EPS)
    cpu = torch.ops.m6.layer_norm(x.cpu(), w.cpu(), b.cpu(), EPS)
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.cpu(), c, atol=1e-5, rtol=1e-5)
    gpu_b = torch.ops.m6.layer_norm_backward(grad, x, w, gpu[1], gpu[2])
    cpu_b = torch.ops.m6.layer_norm_backward(grad.cpu(), x.cpu(), w.cpu(), cpu[1], cpu[2])
    for g, c in zip(gpu_b, cpu_b):
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
@pytest.mark.cuda
def test_layer_norm_non_contiguous_and_misaligned(layout):
    n = 1024
    x, w, b = _ln_inputs((96, n), torch.float16, CUDA, seed=6)
    if layout == "transposed":
        x = x.reshape(n, 96).t()
        assert not x.is_contiguous()
    else:  # contiguous, 2 bytes past a 16-byte boundary: scalar access
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(96, n)
        assert x.is_contiguous() and x.data_ptr() % 16 != 0
    _check_layer_norm(x, w, b)


@pytest.mark.parametrize("dtype,n", [(torch.float32, 200), (torch.bfloat16, 4104), (torch.float16, 1001),
                                     (torch.float32, 65536)],
                         ids=["fp32 4 rows per block", "bf16 vectorised", "fp16 scalar", "fp32 widest"])
@pytest.mark.cuda
def test_layer_norm_every_element_written(dtype, n):
    # NaN-poisoned outputs (and the fp32 partial sums of grad_weight / grad_bias): a position a
    # kernel forgets to write stays NaN. 37 rows: with n = 200 (one warp per row, 4 rows per
    # block) the last block has one row and three past the end.
    x, w, b = _ln_inputs((37, n), dtype, CUDA, seed=7)
    with nan_filled_empty():
        assert torch.empty(16, device=CUDA).isnan().all(), "poisoning is not active"
        outputs = torch.ops.m6.layer_norm(x, w, b, EPS)
        outputs += torch.ops.m6.layer_norm_backward(torch.ones_like(x), x, w, *outputs[1:])
    assert not any(t.isnan().any() for t in outputs)


@pytest.mark.cuda
def test_layer_norm_no_rows():
    w = torch.ones(64, device=CUDA)
    empty = torch.empty(0, 3, 64, device=CUDA)
    y, mean, rstd = torch.ops.m6.layer_norm(empty, w, w, EPS)
    assert y.shape == empty.shape and mean.shape == rstd.shape == (0,)
    dx, dw, db = torch.ops.m6.layer_norm_backward(empty, empty, w, mean, rstd)
    assert dx.shape == empty.shape and torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.cuda
def test_layer_norm_bad_inputs_raise_on_cuda():
    x, w, b = _ln_inputs((4, 8), torch.float32, CUDA)
    with pytest.raises(RuntimeError, match="x must be " + NO_FP64):
        torch.ops.m6.layer_norm(x.double(), w.double(), b.double(), EPS)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        torch.ops.m6.layer_norm(x, w[:4], b, EPS)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        torch.ops.m6.layer_norm(x, w, b.half(), EPS)
    with pytest.raises(RuntimeError, match="weight must be on x's device"):
        torch.ops.m6.layer_norm(x, w.cpu(), b, EPS)
    with pytest.raises(RuntimeError, match=r"hidden size \(x's last dim\) must be in \[1, 65536\]"):
        torch.ops.m6.layer_norm(torch.empty(2, 65537, device=CUDA), torch.empty(65537, device=CUDA),
                                torch.empty(65537, device=CUDA), EPS)
    _, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        torch.ops.m6.layer_norm_backward(x[:2], x, w, mean, rstd)
    with pytest.raises(RuntimeError, match="rstd must be float32"):
        torch.ops.m6.layer_norm_backward(x, x, w, mean, rstd.double())
    with pytest.raises(RuntimeError, match="x must be " + NO_FP64):
        torch.ops.m6.layer_norm_backward(x.double(), x.double(), w.double(), mean.double(), rstd.double())
    with pytest.raises(RuntimeError, match=r"mean must have shape \(4,\)"):
        torch.ops.m6.layer_norm_backward(x, x, w, mean[:2], rstd)


@pytest.mark.cuda
def test_layer_norm_opcheck_on_cuda():
    x, w, b = _ln_inputs((3, 5, 16), torch.float32, CUDA)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.m6.layer_norm.default, (x, w, b, EPS))
    _, mean, rstd = torch.ops.m6.layer_norm(x.detach(), w, b, EPS)
    torch.library.opcheck(torch.ops.m6.layer_norm_backward.default,
                          (torch.randn_like(x), x.detach(), w, mean, rstd))



# ==== Edge cases on both devices: the CPU variants (fp32, small) run everywhere, the CUDA variants
# (marked `cuda`) in every dtype.

def _device_dtypes():
    """(device, dtype) parameters: fp32 on the CPU; fp32, fp16 and bf16 on CUDA (marked `cuda`)."""
    params = []
    for entry in DEVICES:
        device = entry if isinstance(entry, str) else entry.values[0]
        marks = () if isinstance(entry, str) else entry.marks
        for dtype in ALL_DTYPES if device == CUDA else [torch.float32]:
            params.append(pytest.param(device, dtype, marks=marks,
                                       id=f"{device}-{str(dtype).removeprefix('torch.')}"))
    return params


DEVICE_DTYPES = _device_dtypes()
# Row lengths reaching every CUDA path in each dtype (the module docstring): 37 scalar and 40
# vectorised rows are one warp's in both ops; 1031 (scalar) and 2600 (vectorised) sit in several
# warps' registers forward and take the block path backward; 33000 takes the two-pass forward.
PATH_SKS = [37, 40, 1031, 2600, 33000]
INF = float("inf")
NAN = float("nan")


def _visible_keys(prefix, valid, sq, sk, q_offset):
    """Visible keys of each (sample, query row), (B, Sq) int64, counted from the reference's mask."""
    return prefix_lm_mask(prefix.cpu(), valid.cpu(), sq, sk, q_offset)[:, 0].sum(-1)


def _first_mismatches(a, b):
    return (a != b).nonzero()[:5].tolist()


# ---- masked_softmax: NaN and +-inf.

def _check_nonfinite_forward(scores, prefix, valid, q_offset, scale):
    """The forward on scores holding NaN / +-inf against the float64 reference (evaluated on the CPU,
    one definition for both devices): NaN exactly where the reference has NaN, no inf, masked and
    padded positions exactly 0 (outputs NaN-poisoned), the three-way bound on every other position.
    Returns (kernel output, reference), on the CPU."""
    with nan_filled_empty():
        out = ops.masked_softmax(scores, prefix, valid, scale, q_offset)
    composite = _composite(scores, prefix, valid, scale, q_offset).cpu()
    prefix, valid, out = prefix.cpu(), valid.cpu(), out.cpu()
    exact = masked_softmax_reference(scores.double().cpu(), prefix, valid, scale, q_offset)
    nan = exact.isnan()
    assert torch.equal(out.isnan(), nan), (
        f"NaN pattern differs from the reference at {_first_mismatches(out.isnan(), nan)}")
    assert not out.isinf().any()
    _assert_masked_zero(out, prefix, valid, q_offset)
    _assert_three_way(out[~nan], composite[~nan], exact[~nan], FLOOR[scores.dtype], "forward (non-NaN positions)")
    return out, exact


@pytest.mark.parametrize("scale", [SCALE, -0.5, 0.0], ids=["scale>0", "scale<0", "scale=0"])
@pytest.mark.parametrize("sk", PATH_SKS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_nonfinite_scores(device, dtype, sk, scale):
    # The reference (torch.softmax over the visible keys, zeros elsewhere) decides every case; for a
    # positive scale the outcomes are spelled out below. A negative scale swaps the roles of +inf
    # and -inf; scale 0 turns every +-inf into NaN (0 * inf).
    sq, q_offset = 8, sk - 8
    # Sample 0: prefix-LM ending 3 keys early: rows 0-4 see sk - 7 + i keys, rows 5-7 are padding.
    # Sample 1: bidirectional, every row sees all sk keys.
    prefix, valid = _lengths([(sk // 4, sk - 3), (sk, sk)])
    n = [[int(c) for c in row] for row in _visible_keys(prefix, valid, sq, sk, q_offset)]
    x = _scores(2, 1, sq, sk)
    s0, s1 = x[0, 0], x[1, 0]
    k = sk // 2  # visible in every row that sees any key
    s0[0, k] = NAN                      # a NaN score
    s0[1, k] = INF                      # a single +inf
    s0[2, [0, n[0][2] - 1]] = -INF      # -inf at the first and the last visible key
    s0[3, :n[0][3]] = -INF              # every visible key -inf
    s0[4, n[0][4]:] = NAN               # NaN and +inf at masked keys only
    s0[4, -1] = INF
    s0[5], s0[6], s0[7, 0] = NAN, INF, -INF  # padded rows
    s1[0, [1, sk - 2]] = INF            # two +inf
    s1[1, 0], s1[1, 1] = INF, -INF
    s1[2] = -INF                        # one finite key, the rest -inf
    s1[2, k] = 1.0
    s1[3] = -INF                        # one NaN, the rest -inf
    s1[3, k] = NAN
    # Rows 4-7 of sample 1 hold no special value: they must come out as usual.
    out, _ = _check_nonfinite_forward(x.to(device=device, dtype=dtype), prefix.to(device), valid.to(device),
                                      q_offset, scale)
    if scale <= 0:
        return
    o0, o1 = out[0, 0], out[1, 0]

    def nan_row(o, row, visible):  # the visible keys NaN, the masked ones exactly 0
        return bool(o[row, :visible].isnan().all() and (o[row, visible:] == 0).all())

    assert nan_row(o0, 0, n[0][0]), "a NaN score makes its row NaN (as torch.softmax)"
    assert nan_row(o0, 1, n[0][1]), "a single +inf gives NaN (inf - inf), as torch.softmax, not a one-hot row"
    assert o0[2].isfinite().all() and o0[2, 0] == 0 and o0[2, n[0][2] - 1] == 0, "-inf has probability exactly 0"
    assert nan_row(o0, 3, n[0][3]), ("visible keys all -inf: NaN, as torch.softmax (the reference's zero rows "
                                     "are the rows without visible keys)")
    assert o0[4].isfinite().all(), "NaN or inf at masked keys leaked into the row"
    assert torch.all(o0[5:] == 0), "padded rows are 0 whatever their scores"
    assert nan_row(o1, 0, sk) and nan_row(o1, 1, sk)
    assert o1[2, k] == 1 and torch.count_nonzero(o1[2]) == 1, "one finite key among -inf: exactly one-hot"
    assert nan_row(o1, 3, sk)
    assert o1[4:].isfinite().all()


def _check_nonfinite_backward(scores, grad_out, prefix, valid, q_offset, scale=SCALE):
    """The backward (autograd through the op) with NaN / +-inf in grad_out against the float64
    reference's autograd (on the CPU): finite exactly where the reference is finite, NaN wherever it
    is NaN, where it is +-inf the same infinity (or NaN: y * inf where the kernel's y rounded to 0),
    masked and padded positions exactly 0, the three-way bound on the finite positions. Returns the
    kernel's gradient, on the CPU."""
    with nan_filled_empty():
        kernel = _grads(lambda x: ops.masked_softmax(x, prefix, valid, scale, q_offset), scores, grad_out)
    composite = _grads(lambda x: _composite(x, prefix, valid, scale, q_offset), scores, grad_out).cpu()
    prefix, valid, kernel = prefix.cpu(), valid.cpu(), kernel.cpu()
    exact = _grads(lambda x: masked_softmax_reference(x, prefix, valid, scale, q_offset),
                   scores.double().cpu(), grad_out.double().cpu())
    finite = exact.isfinite()
    assert torch.equal(kernel.isfinite(), finite), (
        f"finite pattern differs from the reference at {_first_mismatches(kernel.isfinite(), finite)}")
    assert kernel[exact.isnan()].isnan().all()
    infinite = exact.isinf()
    assert ((kernel[infinite] == exact[infinite]) | kernel[infinite].isnan()).all()
    _assert_masked_zero(kernel, prefix, valid, q_offset)
    floor = FLOOR[scores.dtype] * max(1.0, exact[finite].abs().max().item())
    _assert_three_way(kernel[finite], composite[finite], exact[finite], floor, "backward (finite positions)")
    return kernel


@pytest.mark.parametrize("sk", PATH_SKS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_backward_nonfinite_grad_out(device, dtype, sk):
    # dx = scale * y * (dy - sum_visible(dy * y)): a NaN or inf of dy at a visible key reaches the whole
    # row through the sum; dy at masked keys and padded rows is never read (dx there is exactly 0).
    sq, q_offset = 8, sk - 8
    prefix, valid = _lengths([(sk // 4, sk - 3), (sk, sk)])  # as in test_softmax_nonfinite_scores
    n = [[int(c) for c in row] for row in _visible_keys(prefix, valid, sq, sk, q_offset)]
    dy = torch.randn(2, 1, sq, sk, generator=torch.Generator().manual_seed(3))
    g0, g1 = dy[0, 0], dy[1, 0]
    k = sk // 2
    g0[0, k] = NAN                 # every visible dx NaN
    g0[1, k] = INF                 # dx_k = y_k * (inf - inf) = NaN, the other visible dx -inf
    g0[2, 0] = -INF                # dx_0 NaN, the others +inf
    g0[3, n[0][3]:] = NAN          # masked keys only: the row as if they were 0
    g0[3, -1] = INF
    g0[5], g0[6], g0[7] = NAN, INF, -INF  # padded rows
    g1[0, 1], g1[0, 2] = INF, -INF  # the sum is inf - inf = NaN: the whole row NaN
    g1[1] = INF                    # every dy_j - sum is inf - inf: NaN
    scores = _scores(2, 1, sq, sk, dtype, device=device)
    dx = _check_nonfinite_backward(scores, dy.to(device=device, dtype=dtype), prefix.to(device), valid.to(device),
                                   q_offset)
    d0, d1 = dx[0, 0], dx[1, 0]
    assert d0[0, :n[0][0]].isnan().all()
    assert d0[1, k].isnan() and not d0[1, :n[0][1]].isfinite().any()
    assert d0[2, 0].isnan() and not d0[2, :n[0][2]].isfinite().any()
    assert d0[3].isfinite().all() and d0[4].isfinite().all()
    assert torch.all(d0[5:] == 0)
    assert d1[0].isnan().all() and d1[1].isnan().all() and d1[2:].isfinite().all()


# ---- masked_softmax: rows without a visible key.

@pytest.mark.parametrize("sk", PATH_SKS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_fully_masked_rows_are_zero(device, dtype, sk):
    # Sample 0 has valid_len 0; samples 1 and 2 end 3 and 5 keys early (their rows past valid_len are
    # padding); sample 3 is complete. q_offset moves rows past valid_len: sk - 6 pads some rows, sk - 3
    # every row of samples 0-2, sk and 2^40 every row; per sample, sk - 4 and sk - 6 leave samples 1
    # and 2 one row each, and 2^63 - 1 (q_offset + i past int64) pads all of sample 3. Outputs are
    # NaN-poisoned and every score the mask hides is NaN: a kernel that reads one, or leaves an output
    # unwritten, fails. (One head on the CPU.)
    sq, heads = 6, 2 if device == CUDA else 1
    prefix, valid = _lengths([(0, 0), (sk // 2, sk - 3), (0, sk - 5), (sk, sk)], device=device)
    per_sample = torch.tensor([0, sk - 4, sk - 6, 2**63 - 1], device=device)
    for q_offset in (sk - sq, sk - 3, sk, 2**40, per_sample):
        allowed = prefix_lm_mask(prefix, valid, sq, sk, q_offset).expand(4, heads, sq, sk)
        scores = _scores(4, heads, sq, sk, device=device).masked_fill(~allowed, NAN).to(dtype)
        out = _check_forward(scores, prefix, valid, q_offset, poison=True)
        assert not out.isnan().any()
        assert torch.all(out[~allowed.any(-1)] == 0)  # rows without a visible key
        _check_backward(scores, prefix, valid, q_offset, poison=True)


# ---- More than 2^31 elements (CUDA only; memory permitting).

def _require_free_cuda_memory(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def _rows_around(element, row_len, rows):
    """The first and last rows, and the rows around `element` (2^31: where a 32-bit offset wraps)."""
    edge = (element - 1) // row_len  # the row holding element - 1
    return [r for r in sorted({0, 1, *range(edge - 2, edge + 4), rows - 1}) if r < rows]


def _check_softmax_rows(x_rows, y_rows, dy_rows, dx_rows, samples, positions, prefix, valid, q_offset):
    """Rows of a tensor too big for the reference, each checked alone three ways (forward and backward):
    row j, (Sk,) in x_rows (scores), y_rows (the kernel's output), dy_rows (grad_out) and dx_rows (the
    kernel's gradient), is query positions[j] of sample samples[j]."""
    dtype = x_rows.dtype
    for j, (b, i) in enumerate(zip(samples, positions)):
        x = x_rows[j].view(1, 1, 1, -1)
        y, dy, dx = (t[j].view_as(x) for t in (y_rows, dy_rows, dx_rows))
        p, v, q = prefix[b:b + 1], valid[b:b + 1], q_offset + i
        exact = masked_softmax_reference(x.double(), p, v, SCALE, q)
        _assert_three_way(y, _composite(x, p, v, SCALE, q), exact, FLOOR[dtype], f"forward, sampled row {j}")
        _assert_masked_zero(y, p, v, q)
        exact = _grads(lambda t: masked_softmax_reference(t, p, v, SCALE, q), x.double(), dy.double())
        composite = _grads(lambda t: _composite(t, p, v, SCALE, q), x, dy)
        floor = FLOOR[dtype] * max(1.0, exact.abs().max().item())
        _assert_three_way(dx, composite, exact, floor, f"backward, sampled row {j}")
        _assert_masked_zero(dx, p, v, q)


def _softmax_shape_past(elements, sk):
    """(B, H, Sq, Sk) with B = 2, Sq = 4 and more than `elements` elements."""
    batch, sq = 2, 4
    heads = -(-(elements // sk + 2) // (batch * sq))
    return batch, heads, sq, sk


def _check_softmax_past(elements, sk, device, dtype=torch.bfloat16):
    """masked_softmax forward and backward on scores of more than `elements` elements, checked on the
    rows around element `elements`, the first and the last. Peak memory: 3 tensors of the scores' size."""
    batch, heads, sq, _ = shape = _softmax_shape_past(elements, sk)
    rows = batch * heads * sq
    q_offset = sk - sq
    prefix, valid = _lengths([(0, sk), (sk // 2, sk - 2)], device=device)  # sample 1: rows 2, 3 padding
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.empty(shape, dtype=dtype, device=device).normal_(0, 4, generator=gen)
    out = ops.masked_softmax(scores, prefix, valid, SCALE, q_offset)
    picked = _rows_around(elements, sk, rows)
    x_rows = scores.view(rows, sk)[picked]
    del scores
    grad_out = torch.empty_like(out).normal_(generator=gen)
    grad = torch.ops.m6.masked_softmax_backward(grad_out, out, prefix, valid, SCALE, q_offset_tensor(q_offset, out))
    y_rows, dy_rows, dx_rows = (t.view(rows, sk)[picked] for t in (out, grad_out, grad))
    del out, grad_out, grad
    _check_softmax_rows(x_rows, y_rows, dy_rows, dx_rows, [r // (heads * sq) for r in picked],
                        [r % sq for r in picked], prefix, valid, q_offset)


HUGE_SOFTMAX_SKS = {"registers-vectorised": 32768, "two-pass-vectorised": 32776, "registers-scalar": 8191,
                    "two-pass-scalar": 32771}


@pytest.mark.cuda
@pytest.mark.parametrize("sk", list(HUGE_SOFTMAX_SKS.values()), ids=list(HUGE_SOFTMAX_SKS))
def test_softmax_huge_bf16_past_2_31_elements(sk):
    # (2, H, 4, Sk) bf16 with more than 2^31 elements (4.3 GB): row offsets need 64 bits. The rows
    # around element 2^31 (sample 1: rows 0-1 of a head visible, 2-3 padding), the first and the last
    # are checked against the float64 reference on those rows only. Sk = 32776 / 32771: a row
    # straddles element 2^31.
    batch, heads, sq, _ = _softmax_shape_past(2**31, sk)
    numel = batch * heads * sq * sk
    assert numel > 2**31
    _require_free_cuda_memory(3 * numel * 2 + 2**30)
    _check_softmax_past(2**31, sk, CUDA)


def _check_layer_norm_past(elements, n, device, dtype=torch.bfloat16):
    """layer_norm forward and backward on (rows, N) with rows * N > `elements`: y, mean, rstd and
    grad_x on the rows around element `elements` (and the first and last) against the float64
    reference on those rows; grad_weight / grad_bias (sums over every row) against float64 sums taken
    by chunks of rows, with torch's own backward in `dtype` as the composite. Peak memory: 3 tensors
    of x's size."""
    rows = elements // n + 8
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(rows, n, dtype=dtype, device=device).normal_(5, 3, generator=gen)
    _, w, b = _ln_inputs((1, n), dtype, device)
    y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    picked = _rows_around(elements, n, rows)
    x_rows, y_rows = x[picked], y[picked]
    del y
    exact = _ln_torch_forward(x_rows.double(), w.double(), b.double())
    composite = _ln_torch_forward(x_rows, w, b)
    for name, k, c, e in zip(("y", "mean", "rstd"), (y_rows, mean[picked], rstd[picked]), composite, exact):
        _ln_assert_three_way(k, c, e, dtype, f"{name} (sampled rows)")
    grad_y = torch.empty_like(x).normal_(generator=gen)
    grad_x, grad_w, grad_b = torch.ops.m6.layer_norm_backward(grad_y, x, w, mean, rstd)
    dy_rows, dx_rows = grad_y[picked], grad_x[picked]
    del grad_x
    layer_norm = lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS)  # noqa: E731
    exact = _ln_grads(layer_norm, (x_rows.double(), w.double(), b.double()), dy_rows.double())[0]
    composite = _ln_grads(layer_norm, (x_rows, w, b), dy_rows)[0]
    _ln_assert_three_way(dx_rows, composite, exact, dtype, "grad_x (sampled rows)")
    exact_w = torch.zeros(n, dtype=torch.float64, device=device)
    exact_b = torch.zeros_like(exact_w)
    torch_mean, torch_rstd = [], []
    chunk = max(1, 2**25 // n)  # 256 MB of float64 per temporary
    for start in range(0, rows, chunk):
        xc, dyc = x[start:start + chunk], grad_y[start:start + chunk].double()
        xhat = torch.native_layer_norm(xc.double(), (n,), None, None, EPS)[0]
        exact_w += (dyc * xhat).sum(0)
        exact_b += dyc.sum(0)
        _, m, r = torch.native_layer_norm(xc, (n,), w, b, EPS)  # (chunk, 1) each
        torch_mean.append(m)
        torch_rstd.append(r)
    _, torch_w, torch_b = torch.ops.aten.native_layer_norm_backward(
        grad_y, x, [n], torch.cat(torch_mean), torch.cat(torch_rstd), w, b, [False, True, True])
    _ln_assert_three_way(grad_w, torch_w, exact_w, dtype, "grad_weight")
    _ln_assert_three_way(grad_b, torch_b, exact_b, dtype, "grad_bias")


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1000, 1001], ids=["vectorised", "scalar"])
def test_layer_norm_huge_bf16_past_2_31_elements(n):
    # (rows, N) bf16 with rows * N > 2^31 (4.3 GB); one row straddles element 2^31.
    rows = 2**31 // n + 8
    assert rows * n > 2**31
    _require_free_cuda_memory(3 * rows * n * 2 + 2 * 2**30)
    _check_layer_norm_past(2**31, n, CUDA)


# ---- More than 65535 row blocks.

@pytest.mark.parametrize("sk", [17, 24], ids=["scalar", "vectorised"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_more_than_65535_row_blocks(device, dtype, sk):
    # 14000 x 5 x 4 = 280000 rows of a few keys: 4 rows per 128-thread block (forward and backward)
    # is 70000 blocks, past 65535 (the limit of grid.y / grid.z, where a launcher must grid-stride).
    # The CPU variant runs a tenth of the rows: the same logic at a tenth of the cost.
    batch = 14000 if device == CUDA else 1400
    prefix, valid = _lengths([(0, sk), (sk, sk), (5, sk), (4, sk - 6), (0, 0)] * (batch // 5), device=device)
    scores = _scores(batch, 5, 4, sk, dtype, device=device)
    _check_forward(scores, prefix, valid, sk - 4, poison=True)
    _check_backward(scores, prefix, valid, sk - 4, poison=True)


@pytest.mark.parametrize("n", [8, 7], ids=["vectorised", "scalar"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_layer_norm_more_than_65535_row_blocks(device, dtype, n):
    # Rows of <= 8 elements: 4 rows per 128-thread block, 65537 blocks on CUDA (the CPU variant: a
    # tenth of the rows).
    rows = 65535 * 4 + 5 if device == CUDA else 26215
    _check_layer_norm(*_ln_inputs((rows, n), dtype, device, seed=8))


# ---- Decode shapes.

DECODE_SKS = [17, 273, 529, 1031, 2049, 4099]  # prefix + t generated tokens: not multiples of 8
DECODE_MODES = ["Sq=1 q_offset=Sk-1", "Sq=3 q_offset=Sk-3", "Sq=1 per-sample cursors"]


@pytest.mark.parametrize("mode", DECODE_MODES)
@pytest.mark.parametrize("sk", DECODE_SKS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_decode_shapes(device, dtype, sk, mode):
    if mode == "Sq=1 per-sample cursors":
        # The engine's decode step (docs/architecture.md): q_offset = cursor, valid_len = cursor + 1
        # and the prompt's prefix_len, one cursor per sample; the last sample is padding.
        sq, cursors = 1, [sk - 1, sk - 2, sk // 2, 7, 0, 0]
        pairs = [(min(c, 5), c + 1) for c in cursors[:-1]] + [(0, 0)]
        q_offset, length_dtype = torch.tensor(cursors, dtype=torch.int32, device=device), torch.int32
    else:  # the last Sq rows of a KV cache of Sk keys
        sq = int(mode[3])
        q_offset, pairs, length_dtype = sk - sq, _mixed_lengths(sk), torch.int64
    prefix, valid = _lengths(pairs, length_dtype, device)
    scores = _scores(len(pairs), 4, sq, sk, dtype, device=device, seed=sk)
    _check_forward(scores, prefix, valid, q_offset, poison=True)
    _check_backward(scores, prefix, valid, q_offset, poison=True)


# ---- Memory layouts: non-contiguous, and contiguous but misaligned by one element.

LAYOUTS = ["transposed", "strided", "misaligned"]


def _relayout(t, layout):
    """A copy of t in a layout: "transposed" (the last two dims swapped in memory), "strided" (every
    second element of a buffer twice as wide) or "misaligned" (contiguous, one element past a 16-byte
    boundary: 4 bytes for fp32, 2 bytes for fp16 / bf16, so 16-byte access is illegal)."""
    if layout == "misaligned":
        out = t.new_zeros(t.numel() + 1)[1:].view(t.shape)
        out.copy_(t)
        assert out.is_contiguous() and out.data_ptr() % 16 == t.element_size()
        return out
    if layout == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        out = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
        out.copy_(t)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _check_backward_op(grad_out, out, prefix, valid, q_offset, scale=SCALE):
    """m6::masked_softmax_backward called on (grad_out, out) as given (through autograd it gets fresh
    contiguous ones), three ways: the float64 formula on the same out, torch's softmax backward in
    out's dtype. out must be a forward output (0 at masked positions)."""
    with nan_filled_empty():
        kernel = torch.ops.m6.masked_softmax_backward(grad_out, out, prefix, valid, scale,
                                                      q_offset_tensor(q_offset, out))
    assert kernel.shape == out.shape and kernel.dtype == out.dtype and kernel.is_contiguous()
    exact = masked_softmax_backward_reference(grad_out.double(), out.double(), scale)
    composite = torch._softmax_backward_data(grad_out, out, -1, out.dtype) * scale
    floor = FLOOR[out.dtype] * max(1.0, exact.abs().max().item())
    _assert_three_way(kernel, composite, exact, floor, "backward op")
    _assert_masked_zero(kernel, prefix, valid, q_offset)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sk", [17, 528, 1031, 4099, 4104])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_layouts(device, dtype, sk, layout):
    # Odd decode lengths and multiples of 8, in every dtype; forward and backward both see the layout.
    prefix, valid = _lengths(_mixed_lengths(sk), device=device)
    q_offset = sk - 8
    scores = _relayout(_scores(5, 2, 8, sk, dtype, device=device), layout)
    out = _check_forward(scores, prefix, valid, q_offset)
    _check_backward(scores, prefix, valid, q_offset)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
    _check_backward_op(_relayout(grad_out, layout), _relayout(out, layout), prefix, valid, q_offset)


def _check_layer_norm_backward_op(grad_y, x, w, b):
    """m6::layer_norm_backward called on (grad_y, x, weight) as given, with the kernel's own mean and
    rstd, three ways (tests/test_layer_norm's rule)."""
    _, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
    with nan_filled_empty():
        kernel = torch.ops.m6.layer_norm_backward(grad_y, x, w, mean, rstd)
    layer_norm = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)  # noqa: E731
    composite = _ln_grads(layer_norm, (x, w, b), grad_y)
    exact = _ln_grads(layer_norm, (x.double(), w.double(), b.double()), grad_y.double())
    for name, k, c, e in zip(("grad_x", "grad_weight", "grad_bias"), kernel, composite, exact):
        assert k.dtype == x.dtype and k.shape == e.shape and not k.isnan().any()
        _ln_assert_three_way(k, c, e, x.dtype, f"{name} (backward op)")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [17, 1001, 1024, 4097])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_layer_norm_layouts(device, dtype, n, layout):
    # x in the layout (misaligned: weight and bias too), through autograd, then the backward op with
    # grad_y in the layout as well. 37 rows: a partial last block of rows.
    x, w, b = _ln_inputs((37, n), dtype, device, seed=9)
    x = _relayout(x, layout)
    if layout == "misaligned":
        w, b = _relayout(w, layout), _relayout(b, layout)
    _check_layer_norm(x, w, b)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(10)).to(x)
    _check_layer_norm_backward_op(_relayout(grad_y, layout), x, w, b)


# ---- layer_norm: NaN and +-inf.

@pytest.mark.parametrize("n", [7, 1024, 4097])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_layer_norm_nonfinite_inputs(device, dtype, n):
    # A NaN or +-inf in a row of x makes that row's y and grad_x non-finite (NaN in torch), and every
    # grad_weight (a sum over all rows); a NaN in grad_y reaches its row of grad_x and its column of
    # grad_weight / grad_bias. Everything else is as without them: the three-way bound. mean and rstd
    # of such rows are not compared (their non-finite flavour is the kernels' own).
    x, w, b = _ln_inputs((9, n), dtype, device, seed=12)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(13)).to(x)
    x[1, n // 2], x[3, 0], x[5, n - 1] = NAN, INF, -INF
    grad_y[7, n // 3] = NAN
    layer_norm = lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS)  # noqa: E731
    y = torch.ops.m6.layer_norm(x, w, b, EPS)[0]
    kernel = (y, *_ln_grads(lambda *t: ops.layer_norm(*t, eps=EPS), (x, w, b), grad_y))
    exact = (layer_norm(x.double(), w.double(), b.double()),
             *_ln_grads(layer_norm, (x.double(), w.double(), b.double()), grad_y.double()))
    composite = (layer_norm(x, w, b), *_ln_grads(layer_norm, (x, w, b), grad_y))
    for name, k, c, e in zip(("y", "grad_x", "grad_weight", "grad_bias"), kernel, composite, exact):
        finite = e.isfinite()
        assert torch.equal(k.isfinite(), finite), (
            f"{name}: finite pattern differs from torch's at {_first_mismatches(k.isfinite(), finite)}")
        if finite.any():
            _ln_assert_three_way(k[finite], c[finite], e[finite], dtype, f"{name} (finite positions)")
    y, grad_x, grad_w, grad_b = (t.cpu() for t in kernel)
    assert not y[[1, 3, 5]].isfinite().any() and y[[0, 2, 4, 6, 7, 8]].isfinite().all()
    assert not grad_x[[1, 3, 5, 7]].isfinite().any() and grad_x[[0, 2, 4, 6, 8]].isfinite().all()
    assert not grad_w.isfinite().any()
    assert grad_b[n // 3].isnan() and torch.count_nonzero(~grad_b.isfinite()) == 1


# ---- Bitwise determinism.

def _two_calls(compute, device):
    """compute() twice: normally, then with NaN-poisoned outputs (nothing may depend on memory
    contents) and, on the CPU, on one thread (nothing may depend on how work is split)."""
    threads = torch.get_num_threads()
    try:
        first = compute()
        if device == "cpu":
            torch.set_num_threads(1)
        with nan_filled_empty():
            second = compute()
    finally:
        torch.set_num_threads(threads)
    return first, second


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_softmax_bitwise_deterministic(device, dtype):
    # An M6 attention shape (m6-base: 8 x 16 x 528 x 528, prefix 272), smaller. Two calls on the same
    # inputs give the same bits forward and backward; the second with NaN-poisoned outputs (nothing
    # depends on memory contents) and, on the CPU, on one thread.
    prefix, valid = _lengths([(272, 528), (0, 400), (528, 528), (16, 300)], device=device)
    scores = _scores(4, 4, 528, 528, dtype, device=device)
    grad_out = torch.randn(scores.shape, generator=torch.Generator().manual_seed(14)).to(scores)
    def both():
        out = ops.masked_softmax(scores, prefix, valid, SCALE, 0)
        return out, torch.ops.m6.masked_softmax_backward(grad_out, out, prefix, valid, SCALE,
                                                         q_offset_tensor(0, out))

    runs = _two_calls(both, device)
    assert torch.equal(runs[0][0], runs[1][0]), "forward differs between two calls"
    assert torch.equal(runs[0][1], runs[1][1]), "backward differs between two calls"
    _check_forward(scores, prefix, valid, 0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES + [pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16")])
def test_layer_norm_bitwise_deterministic(device, dtype):
    # The M6 hidden states of 8 samples of 528 tokens: y, mean, rstd, grad_x and the cross-row sums
    # grad_weight / grad_bias bit-identical across two calls (the second as in the softmax test).
    x, w, b = _ln_inputs((8 * 528, 1024), dtype, device, seed=11)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(15)).to(x)
    def both():
        y, mean, rstd = torch.ops.m6.layer_norm(x, w, b, EPS)
        return (y, mean, rstd, *torch.ops.m6.layer_norm_backward(grad_y, x, w, mean, rstd))

    runs = _two_calls(both, device)
    for name, first, again in zip(("y", "mean", "rstd", "grad_x", "grad_weight", "grad_bias"), *runs):
        assert torch.equal(first, again), f"{name} differs between two calls"
    if device == CUDA or dtype == torch.float32:  # torch's bf16 layer norm on the CPU is slow
        _check_layer_norm(x, w, b)
