"""The build: CUDA_HOME resolution and the CUDA-or-not decision (build_support.py), and that the
built m6_engine._C carries the kernels this machine's toolchain calls for.

Runs without a GPU and compiles nothing (the CUDA sources are compiled by `make install`). The
unit tests pass their environment as a dict and fake toolkits as folders with an executable
bin/nvcc (never run), so they do not depend on what this machine has installed.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import build_support
import m6_engine.ops as ops
from tests import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("masked_softmax", "masked_softmax_backward", "layer_norm", "layer_norm_backward")
DEFAULT_ARCH_LIST = "8.0;9.0"  # setup.py's default when TORCH_CUDA_ARCH_LIST is unset


def _fake_toolkit(root, name, executable=True):
    """A folder with a bin/nvcc that never runs; returns the folder."""
    bin_dir = root / name / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755 if executable else 0o644)
    return str(root / name)


@pytest.fixture
def no_default_toolkit(monkeypatch, tmp_path):
    """Point build_support.DEFAULT_TOOLKIT at a folder that is not a toolkit (this machine's
    /usr/local/cuda must not decide the unit tests)."""
    monkeypatch.setattr(build_support, "DEFAULT_TOOLKIT", str(tmp_path / "no-default-toolkit"))


# ---- toolkit_home: the order of the candidates.

def test_toolkit_home_order(tmp_path, no_default_toolkit, monkeypatch):
    home, path, default = (_fake_toolkit(tmp_path, n) for n in ("home", "path", "default"))
    on_path = _fake_toolkit(tmp_path, "on-path")
    env = {"CUDA_HOME": home, "CUDA_PATH": path, "PATH": os.path.join(on_path, "bin")}
    assert build_support.toolkit_home(env) == home
    del env["CUDA_HOME"]
    assert build_support.toolkit_home(env) == path
    del env["CUDA_PATH"]
    assert build_support.toolkit_home(env) == on_path
    monkeypatch.setattr(build_support, "DEFAULT_TOOLKIT", default)
    assert build_support.toolkit_home(env) == default  # /usr/local/cuda before torch's PATH guess
    assert build_support.toolkit_home({"PATH": ""}) == default


def test_toolkit_home_follows_a_symlinked_nvcc(tmp_path, no_default_toolkit):
    # The failure torch has on these machines: /usr/local/bin/nvcc -> the toolkit's nvcc makes
    # torch guess /usr/local; the real path leads to the toolkit.
    toolkit = _fake_toolkit(tmp_path, "cuda-13.0")
    prefix_bin = tmp_path / "usr-local" / "bin"
    prefix_bin.mkdir(parents=True)
    (prefix_bin / "nvcc").symlink_to(os.path.join(toolkit, "bin", "nvcc"))
    assert build_support.toolkit_home({"PATH": str(prefix_bin)}) == toolkit


def test_toolkit_home_skips_what_is_not_a_toolkit(tmp_path, no_default_toolkit):
    not_executable = _fake_toolkit(tmp_path, "no-exec", executable=False)
    real = _fake_toolkit(tmp_path, "real")
    env = {"CUDA_HOME": str(tmp_path / "missing"), "CUDA_PATH": not_executable,
           "PATH": os.path.join(real, "bin")}
    assert build_support.toolkit_home(env) == real
    env["PATH"] = str(tmp_path)  # no nvcc anywhere
    assert build_support.toolkit_home(env) is None


# ---- M6_BUILD_CUDA and the decision.

@pytest.mark.parametrize("value,flag", [(None, "auto"), ("", "auto"), ("auto", "auto"), (" AUTO ", "auto"),
                                        ("0", "0"), ("1", "1"), (" 1\n", "1")])
def test_build_flag_values(value, flag):
    env = {} if value is None else {"M6_BUILD_CUDA": value}
    assert build_support.build_flag(env) == flag


@pytest.mark.parametrize("value", ["yes", "2", "true", "gpu"])
def test_build_flag_rejects_other_values(value):
    with pytest.raises(build_support.BuildError, match=f"M6_BUILD_CUDA must be 0, 1, auto or unset, got '{value}'"):
        build_support.build_flag({"M6_BUILD_CUDA": value})


def test_cuda_build_home_decision(tmp_path, no_default_toolkit):
    toolkit = _fake_toolkit(tmp_path, "cuda")
    with_kit = {"CUDA_HOME": toolkit, "PATH": ""}
    without_kit = {"PATH": ""}
    decide = build_support.cuda_build_home
    # auto: CUDA exactly when torch has CUDA and a toolkit is found.
    assert decide(with_kit, torch_cuda="13.0") == toolkit
    assert decide(with_kit, torch_cuda=None) is None
    assert decide(without_kit, torch_cuda="13.0") is None
    # 0: CPU-only whatever is installed.
    assert decide({**with_kit, "M6_BUILD_CUDA": "0"}, torch_cuda="13.0") is None
    # 1: CUDA, or an error that says which half is missing and what to do.
    assert decide({**with_kit, "M6_BUILD_CUDA": "1"}, torch_cuda="13.0") == toolkit
    with pytest.raises(build_support.BuildError,
                       match=r"M6_BUILD_CUDA=1 but no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc"):
        decide({**without_kit, "M6_BUILD_CUDA": "1"}, torch_cuda="13.0")
    with pytest.raises(build_support.BuildError, match=r"M6_BUILD_CUDA=1 but torch is a CPU-only build"):
        decide({**with_kit, "M6_BUILD_CUDA": "1"}, torch_cuda=None)


def test_cuda_build_home_asks_the_installed_torch(tmp_path, no_default_toolkit):
    toolkit = _fake_toolkit(tmp_path, "cuda")
    expected = toolkit if torch.version.cuda is not None else None
    assert build_support.cuda_build_home({"CUDA_HOME": toolkit, "PATH": ""}) == expected


def test_setup_py_reports_a_bad_flag_clearly(tmp_path):
    # setup.py turns BuildError into one line on stderr and exit status 1, before any compile.
    env = {**os.environ, "M6_BUILD_CUDA": "maybe"}
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path),
                             "--build-lib", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "m6-engine build error: M6_BUILD_CUDA must be 0, 1, auto or unset, got 'maybe'" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing may be built"


# ---- The built extension.

def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"m6::{op}", key)


def test_extension_kernels_match_the_toolchain():
    # The same rule as the build, in this environment: M6_BUILD_CUDA=0 expects a CPU-only build.
    ops.require_extension()
    expected = build_support.cuda_build_home(os.environ) is not None
    hint = ("torch has CUDA and a toolkit was found, so the build must include the CUDA kernels: "
            "rebuild with `make install` (or run the tests with M6_BUILD_CUDA=0 for a CPU-only build)")
    assert ops.cuda_kernels_built() == expected, hint if expected else "CUDA kernels built but not expected"
    for op in OPS:
        assert _has_kernel(op, "CPU"), f"m6::{op} has no CPU kernel"
        assert _has_kernel(op, "CUDA") == expected, f"m6::{op}: CUDA kernel registered = {not expected}"


def _wanted_archs():
    """{"80", "90", ...} from TORCH_CUDA_ARCH_LIST (entries like "8.0", "9.0+PTX", "8.6")."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    return {m.group(1) + m.group(2) for m in re.finditer(r"(\d+)\.(\d+)", spec)}


def test_cuda_build_has_device_code_for_each_arch():
    if not ops.cuda_kernels_built():
        pytest.skip("CPU-only build (test_extension_kernels_match_the_toolchain says whether it should be)")
    tool = sass.find_tool("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump to list the device code with")
    so = ops.require_extension().__file__
    listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True,
                             timeout=120).stdout
    found = set(re.findall(r"\.sm_(\d+)[a-z]?\.cubin", listing))
    missing = _wanted_archs() - found
    assert not missing, f"{so} has cubins for sm_{sorted(found)}, none for sm_{sorted(missing)}"
    for kernel_file in ("masked_softmax_cuda", "layer_norm_cuda"):
        assert kernel_file in listing, f"no device code from {kernel_file}.cu"


# ---- The CPU kernels' SIMD level: chosen from the CPU flags, recorded, checked before loading.

AVX512_FLAGS = frozenset("fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512dq".split())
AVX2_FLAGS = frozenset("fpu sse2 avx avx2 fma f16c".split())


@pytest.mark.parametrize("flags,level", [(AVX512_FLAGS, "avx512"), (AVX512_FLAGS - {"avx512bw"}, "avx2"),
                                         (AVX2_FLAGS, "avx2"), (AVX2_FLAGS - {"f16c"}, "default"),
                                         (frozenset(), "default")])
def test_cpu_capability_is_the_best_the_flags_allow(flags, level):
    assert build_support.cpu_capability({}, flags) == level
    assert build_support.cpu_capability({"M6_CPU_CAPABILITY": "auto"}, flags) == level


def test_cpu_capability_override_and_bad_values():
    assert build_support.cpu_capability({"M6_CPU_CAPABILITY": "AVX2"}, AVX512_FLAGS) == "avx2"
    assert build_support.cpu_capability({"M6_CPU_CAPABILITY": "avx512"}, AVX2_FLAGS) == "avx512"  # cross-build
    with pytest.raises(build_support.BuildError, match="M6_CPU_CAPABILITY must be one of avx512, avx2, default"):
        build_support.cpu_capability({"M6_CPU_CAPABILITY": "sse"}, AVX2_FLAGS)


def test_cpu_compile_flags_define_the_aten_capability():
    flags = build_support.cpu_compile_flags("avx512")
    assert "-mavx512bw" in flags and "-DCPU_CAPABILITY_AVX512" in flags and "-DCPU_CAPABILITY=AVX512" in flags
    assert "-DCPU_CAPABILITY_AVX2" in build_support.cpu_compile_flags("avx2")
    assert build_support.cpu_compile_flags("default") == []


def test_host_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert build_support.host_cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    assert build_support.host_cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_a_build_this_cpu_cannot_run_is_refused_with_the_missing_flags(tmp_path):
    from m6_engine.ops._extension import cpu_flags_problem

    record = tmp_path / build_support.CPU_FLAGS_FILE
    record.write_text(build_support.cpu_flags_record("avx512"))
    problem = cpu_flags_problem(str(record), set(AVX2_FLAGS))
    assert "built for avx512 CPUs, but this CPU lacks avx512f avx512bw avx512vl avx512dq" in problem
    assert "M6_CPU_CAPABILITY=avx2" in problem
    assert cpu_flags_problem(str(record), set(AVX512_FLAGS)) is None
    assert cpu_flags_problem(str(tmp_path / "no-record"), set(AVX2_FLAGS)) is None  # nothing to check


def test_setup_py_reports_a_bad_capability_clearly(tmp_path):
    env = {**os.environ, "M6_CPU_CAPABILITY": "sse", "M6_BUILD_CUDA": "0"}
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path),
                             "--build-lib", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "m6-engine build error: M6_CPU_CAPABILITY must be one of avx512, avx2, default or auto, got 'sse'" \
        in result.stderr
    assert not list(tmp_path.iterdir()), "nothing may be built"


def test_extension_capability_matches_the_build_rule():
    # The build recorded what it compiled for, and the kernels say the same.
    expected = build_support.cpu_capability(os.environ)
    assert ops.cpu_capability() == expected, (
        f"m6_engine._C has {ops.cpu_capability()} kernels, the build rule says {expected}: run `make install`")
    record = os.path.join(os.path.dirname(ops.require_extension().__file__), build_support.CPU_FLAGS_FILE)
    with open(record) as f:
        assert f.read() == build_support.cpu_flags_record(expected)
