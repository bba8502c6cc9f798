"""Static checks of the CUDA kernels' machine code in the built m6_engine._C, for every architecture
of the build: no local memory, registers within each kernel's launch bounds, the hardware exp in
the half-precision softmax forwards, and float64 math without float32 fast-math intrinsics in the
initialisation's normal draws. No GPU needed (tests/sass.py reads the fatbinary).

A failure names the kernel (demangled) and the architecture. Skipped on a CPU-only build.
"""

import os
import subprocess

import pytest

import build_support
import m6_engine.ops as ops
from tests import sass

M6_SYMBOLS = "_ZN2m6"  # kernels in namespace m6 (anonymous namespaces inside it included)
HALF_TYPES = ("c10::Half", "c10::BFloat16")
# Blocks per SM each kernel family's launch bounds ask for (__launch_bounds__(threads, min_blocks)
# in csrc/): ptxas must fit its registers into 65536 / (threads * min_blocks) without spilling.
# A family absent here declares min_blocks = 1.
MIN_BLOCKS = {
    "softmax_fwd_regs": 4,
    "layer_norm_fwd_regs_kernel": 8,
    "layer_norm_bwd_regs_kernel": 3,
    "layer_norm_fwd_loop_kernel": 2,
    "layer_norm_bwd_dx_loop_kernel": 2,
    "layer_norm_bwd_wb_partial_kernel": 4,
}


@pytest.fixture(scope="module")
def kernels():
    if not ops.cuda_kernels_built():
        pytest.skip("CPU-only build: no device code to inspect")
    try:
        found = sass.read_kernels(ops.require_extension().__file__, M6_SYMBOLS)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert found, "the CUDA build has no m6 kernels"
    return found


def _failures(lines):
    return "\n  ".join([f"{len(lines)} kernel(s):", *lines])


def test_no_local_memory_in_any_kernel(kernels):
    bad = [f"{k.where}: {k.local_memory_instructions()} LDL/STL, {k.local} B local, {k.stack} B stack"
           for k in kernels if k.local_memory_instructions() or k.local]
    assert not bad, "local memory (register spills or run-time-indexed arrays): " + _failures(bad)


def test_registers_within_the_declared_launch_bounds(kernels):
    undeclared = [k.where for k in kernels if k.max_threads is None]
    assert not undeclared, "no __launch_bounds__: " + _failures(undeclared)
    over = []
    for k in kernels:
        limit = k.register_limit(MIN_BLOCKS.get(sass.kernel_family(k), 1))
        if k.registers > limit:
            over.append(f"{k.where}: {k.registers} registers > {limit} ({k.max_threads} threads x "
                        f"{MIN_BLOCKS.get(sass.kernel_family(k), 1)} blocks per SM)")
    assert not over, _failures(over)


def test_half_precision_softmax_forwards_use_the_hardware_exp(kernels):
    forwards = [k for k in kernels if sass.kernel_family(k).startswith("softmax_fwd")
                and sass.template_arguments(k)[:1] and sass.template_arguments(k)[0] in HALF_TYPES]
    assert forwards, "no half-precision softmax forward kernel found"
    software = [f"{k.where}: no MUFU.EX2" for k in forwards if not k.opcodes["MUFU.EX2"]]
    assert not software, "software exp in a half-precision forward: " + _failures(software)


# The float32 approximations --use_fast_math substitutes for logf, sinf, cosf, expf: none may appear
# in the normal draws, whose CPU twin computes the same bits in float64 (csrc/init/philox_normal.h).
FAST_MATH_OPCODES = ("MUFU.LG2", "MUFU.SIN", "MUFU.COS", "MUFU.EX2")


def test_the_normal_draws_run_float64_math_without_fast_math_intrinsics(kernels):
    draws = [k for k in kernels if sass.kernel_family(k) == "normal_shard_kernel"]
    assert {sass.template_arguments(k)[0] for k in draws} == {"float", *HALF_TYPES}, "normal_shard_kernel missing"
    fast = [f"{k.where}: {op}" for k in draws for op in FAST_MATH_OPCODES if k.opcodes[op]]
    assert not fast, "float32 fast-math intrinsics in the normal draws: " + _failures(fast)
    # The polynomials are float64 FMAs; the radius's correctly rounded sqrt starts from MUFU.RSQ64H.
    missing = [k.where for k in draws if not (k.opcodes["DFMA"] and k.opcodes["MUFU.RSQ64H"])]
    assert not missing, "no float64 FMA / sqrt: " + _failures(missing)
    philox = [k for k in kernels if sass.kernel_family(k) == "philox_kernel"]
    assert philox and all(k.opcodes["IMAD.WIDE.U32"] for k in philox), "Philox's 32 x 32 -> 64-bit products"


def test_every_architecture_has_the_same_kernels(kernels):
    by_arch = {}
    for k in kernels:
        by_arch.setdefault(k.arch, set()).add(k.mangled)
    first = min(by_arch)
    for arch, symbols in by_arch.items():
        assert symbols == by_arch[first], f"{arch} and {first} differ in {sorted(symbols ^ by_arch[first])[:4]}"


# ---- The checker itself: on a kernel made to spill and one without exp, it must say so.

_PROBE = r"""
__global__ void __launch_bounds__(256) spills(float* out, const int* index) {
  float table[256];  // indexed at run time: local memory
#pragma unroll 1
  for (int i = 0; i < 256; ++i) table[i] = out[i * blockDim.x + threadIdx.x];
  table[index[threadIdx.x] & 255] += 1.f;
  out[threadIdx.x] = table[index[threadIdx.x + blockDim.x] & 255];
}
__global__ void __launch_bounds__(128) polynomial_exp(float* x) {
  const float t = x[threadIdx.x];
  x[threadIdx.x] = 1.f + t * (1.f + t * (0.5f + t * 0.16666667f));
}
__global__ void __launch_bounds__(128) hardware_exp(float* x) { x[threadIdx.x] = exp2f(x[threadIdx.x]); }
"""


def test_the_checker_sees_local_memory_launch_bounds_and_exp(tmp_path):
    home = build_support.toolkit_home(os.environ)
    if home is None or sass.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump")
    source = tmp_path / "probe.cu"
    source.write_text(_PROBE)
    fatbin = tmp_path / "probe.fatbin"
    subprocess.run([os.path.join(home, "bin", "nvcc"), "-fatbin", "-gencode", "arch=compute_80,code=sm_80",
                    "-O3", "--use_fast_math", str(source), "-o", str(fatbin)],
                   check=True, capture_output=True, timeout=300)
    found = {sass.kernel_family(k): k for k in sass.read_kernels(str(fatbin))}
    assert set(found) == {"spills", "polynomial_exp", "hardware_exp"}
    assert found["spills"].local_memory_instructions() > 0 and found["spills"].arch == "sm_80"
    assert found["spills"].max_threads == 256 and found["spills"].register_limit() == 256
    assert found["polynomial_exp"].local_memory_instructions() == 0
    assert found["polynomial_exp"].opcodes["MUFU.EX2"] == 0 and found["hardware_exp"].opcodes["MUFU.EX2"] > 0
    assert found["hardware_exp"].max_threads == 128 and found["hardware_exp"].registers > 0
