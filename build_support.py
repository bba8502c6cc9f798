"""Build-time decisions of setup.py that tests can check: where the CUDA toolkit is, whether
to build the CUDA kernels at all, and which SIMD level the CPU kernels are compiled for.

Imported by setup.py (before ``torch.utils.cpp_extension``) and by tests/test_build.py; it never
imports ``torch.utils.cpp_extension`` itself and changes no environment variable: the caller sets
``CUDA_HOME`` from :func:`cuda_build_home`'s answer.

Why the toolkit is resolved here: ``torch.utils.cpp_extension`` guesses it from the place of
``nvcc`` on PATH (e.g. /usr/local/bin/nvcc -> /usr/local) and then fails to link ``-lcudart``; it
reads ``CUDA_HOME`` once, at import, so the right folder must be in the environment before that.
"""

import os
import shutil
from typing import FrozenSet, List, Mapping, Optional

# Where NVIDIA's installers put the toolkit; preferred over a guess from nvcc's place on PATH.
DEFAULT_TOOLKIT = "/usr/local/cuda"
# Values of M6_BUILD_CUDA: "0" CPU-only, "1" CUDA or fail, "auto" (or unset / empty) CUDA when possible.
BUILD_FLAG_VALUES = ("0", "1", "auto")

_TORCH_CUDA_UNKNOWN = object()  # cuda_build_home's default: ask the installed torch


class BuildError(RuntimeError):
    """A build precondition is not met; the message says what is wrong and what to do."""


def is_toolkit(home: Optional[str]) -> bool:
    """True when ``home`` is a CUDA toolkit folder, i.e. has an executable ``bin/nvcc``."""
    return bool(home) and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)


def toolkit_home(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The CUDA toolkit to build with, or None.

    Candidates in order, the first that :func:`is_toolkit`: ``CUDA_HOME``, ``CUDA_PATH``,
    :data:`DEFAULT_TOOLKIT`, then the folder above the real path of ``nvcc`` found on
    ``environ["PATH"]`` (torch's guess, made safe by following symlinks into the toolkit).
    A ``CUDA_HOME`` that is not a toolkit is skipped, not trusted.
    """
    candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH"), DEFAULT_TOOLKIT]
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((home for home in candidates if is_toolkit(home)), None)


def build_flag(environ: Mapping[str, str] = os.environ) -> str:
    """M6_BUILD_CUDA normalised to "0", "1" or "auto"; raises :class:`BuildError` on other values."""
    flag = environ.get("M6_BUILD_CUDA", "").strip().lower() or "auto"
    if flag not in BUILD_FLAG_VALUES:
        raise BuildError(f"M6_BUILD_CUDA must be 0, 1, auto or unset, got {environ['M6_BUILD_CUDA']!r}")
    return flag


def _installed_torch_cuda() -> Optional[str]:
    try:
        import torch
    except ImportError as error:
        raise BuildError("torch is not installed: run `make install` "
                         "(or `pip install -r requirements.txt`) first") from error
    return torch.version.cuda


def cuda_build_home(environ: Mapping[str, str] = os.environ,
                    torch_cuda=_TORCH_CUDA_UNKNOWN) -> Optional[str]:
    """The toolkit folder when the CUDA kernels are to be built, None for a CPU-only build.

    ``torch_cuda`` is the CUDA version torch was built with (``torch.version.cuda``, None for a
    CPU-only torch); by default the installed torch is asked, unless M6_BUILD_CUDA=0.
    M6_BUILD_CUDA=0: None. auto: the toolkit when torch has CUDA and one is found, else None.
    1: the toolkit, or :class:`BuildError` saying which of the two is missing.
    """
    flag = build_flag(environ)
    if flag == "0":
        return None
    if torch_cuda is _TORCH_CUDA_UNKNOWN:
        torch_cuda = _installed_torch_cuda()
    home = toolkit_home(environ)
    if torch_cuda is not None and home is not None:
        return home
    if flag == "1":
        why = ("torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch"
               if torch_cuda is None else
               f"no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc (tried CUDA_HOME, "
               f"CUDA_PATH, {DEFAULT_TOOLKIT} and nvcc on PATH)")
        raise BuildError(f"M6_BUILD_CUDA=1 but {why}")
    return None


# SIMD levels of the CPU kernels, best first: the /proc/cpuinfo flags each needs (ATen's AVX-512
# vectors use F, BW, VL and DQ) and the compiler flags that turn them on. at::vec::Vectorized is
# only SIMD with the matching CPU_CAPABILITY_<LEVEL> macro (cpu_compile_flags adds it).
CPU_CAPABILITIES = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "default": ((), []),
}
# Name of the file written next to the built extension: its capability and the CPU flags it needs,
# which m6_engine.ops checks before loading it (a kernel built for AVX-512 would die with SIGILL
# on a CPU without it; the check turns that into an error saying what to rebuild).
CPU_FLAGS_FILE = "_C.cpu_flags"


def host_cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> FrozenSet[str]:
    """The flags of the first CPU in ``cpuinfo_path``; empty where it cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capability(environ: Mapping[str, str] = os.environ,
                   flags: Optional[FrozenSet[str]] = None) -> str:
    """The SIMD level to compile the CPU kernels for: M6_CPU_CAPABILITY when set (avx512, avx2 or
    default; auto or unset: detect), else the best level whose flags ``flags`` (default: this
    machine's) all has. Like -march=native, a build for the machine that builds it: set
    M6_CPU_CAPABILITY to build on one machine for another."""
    wanted = environ.get("M6_CPU_CAPABILITY", "").strip().lower() or "auto"
    if wanted != "auto":
        if wanted not in CPU_CAPABILITIES:
            raise BuildError(f"M6_CPU_CAPABILITY must be one of {', '.join(CPU_CAPABILITIES)} or auto, "
                             f"got {environ['M6_CPU_CAPABILITY']!r}")
        return wanted
    flags = host_cpu_flags() if flags is None else flags
    return next(level for level, (needed, _) in CPU_CAPABILITIES.items() if set(needed) <= flags)


def cpu_compile_flags(capability: str) -> List[str]:
    """Compiler flags and the ATen capability macros for ``capability``."""
    if capability == "default":
        return []
    macro = capability.upper()
    return CPU_CAPABILITIES[capability][1] + [f"-DCPU_CAPABILITY_{macro}", f"-DCPU_CAPABILITY={macro}"]


def cpu_flags_record(capability: str) -> str:
    """Text of :data:`CPU_FLAGS_FILE`: the capability, then the CPU flags it needs, on one line."""
    return " ".join((capability,) + CPU_CAPABILITIES[capability][0]) + "\n"
