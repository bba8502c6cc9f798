"""The one availability gate of the compiled kernels (``m6_engine._C``).

Importing ``m6_engine._C`` registers the ``m6::`` ops with torch (CPU, and CUDA when built).
The import is tried once, when ``m6_engine.ops`` is first imported; nothing below ever imports the
extension inside a forward. A missing or stale build is remembered with the reason, and a fused op
called without it raises :class:`ExtensionNotBuiltError` saying how to build it.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

import torch  # noqa: F401  (loads libtorch, which m6_engine._C links against)

BUILD_HINT = (
    "build it from the repository root with `make install` "
    "(or `pip install --no-build-isolation -e .`; `M6_BUILD_CUDA=0` for a CPU-only build)"
)


class ExtensionNotBuiltError(RuntimeError):
    """A fused m6 op was called but m6_engine._C is not built or does not load."""


# M6_EXTENSION_DIR: a folder holding another build of the extension (its _C*.so and _C.cpu_flags, as
# `setup.py build_ext --build-lib DIR` leaves them in DIR/m6_engine), loaded instead of the package's
# own: one checkout run against a second torch without touching its in-place build (`make
# test-torch211`). A build elsewhere on PYTHONPATH would not do: ``m6_engine._C`` is looked up in
# the package's folder only.
_EXTENSION_DIR = os.path.abspath(os.environ["M6_EXTENSION_DIR"]) if os.environ.get("M6_EXTENSION_DIR") else None
# Written next to the extension by setup.py (build_support.CPU_FLAGS_FILE): "<capability> <flag>...".
_CPU_FLAGS_RECORD = os.path.join(
    _EXTENSION_DIR or os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C.cpu_flags")


def _host_cpu_flags(cpuinfo_path="/proc/cpuinfo"):
    """This CPU's flags from /proc/cpuinfo; empty where it cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path) as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def cpu_flags_problem(record_path=_CPU_FLAGS_RECORD, host_flags=None):
    """Why this CPU cannot run the built CPU kernels, or None when it can (or nobody can tell).

    The build compiles for the building machine's SIMD level (like -march=native); loading an
    AVX-512 build on a CPU without AVX-512 would kill the process with SIGILL, so the recorded
    flags are checked before the import.
    """
    try:
        with open(record_path) as f:
            words = f.read().split()
    except OSError:
        return None
    host_flags = _host_cpu_flags() if host_flags is None else host_flags
    if not words or not host_flags:
        return None
    missing = [flag for flag in words[1:] if flag not in host_flags]
    if not missing:
        return None
    return (f"m6_engine._C was built for {words[0]} CPUs, but this CPU lacks {' '.join(missing)}: rebuild it "
            f"on this machine (`make clean install`), or with M6_CPU_CAPABILITY=avx2 (or default) for "
            f"every machine of a mixed cluster")


def _import_extension():
    if _EXTENSION_DIR is None:
        return importlib.import_module("m6_engine._C")
    spec = importlib.machinery.PathFinder.find_spec("m6_engine._C", [_EXTENSION_DIR])
    if spec is None:
        raise ImportError(f"no m6_engine._C in M6_EXTENSION_DIR={_EXTENSION_DIR}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["m6_engine._C"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["m6_engine._C"]
        raise
    return module


def _load():
    problem = cpu_flags_problem()
    if problem is not None:
        return None, problem
    try:
        module = _import_extension()
    except ImportError as error:  # not built, or built against another torch (undefined symbol)
        text = str(error)
        if "undefined symbol" in text or "version" in text.lower():
            return None, f"m6_engine._C is stale (built against another torch?): {text}"
        return None, f"m6_engine._C is not built ({text})"
    return module, None


_MODULE, _LOAD_ERROR = _load()


def extension_available() -> bool:
    """True when the compiled kernels are loaded."""
    return _MODULE is not None


def require_extension():
    """Return the loaded extension module, or raise with the reason and how to build it."""
    if _MODULE is None:
        raise ExtensionNotBuiltError(f"{_LOAD_ERROR}; {BUILD_HINT}")
    return _MODULE


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _MODULE is not None and bool(_MODULE.with_cuda())


def cpu_capability() -> str:
    """SIMD level the CPU kernels were compiled for ("avx2", "avx512" or "default")."""
    return require_extension().cpu_capability()
