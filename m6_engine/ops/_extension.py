"""The one availability gate of the compiled kernels (``m6_engine._C``).

Importing ``m6_engine._C`` registers the ``m6::`` ops with torch (CPU, and CUDA when built).
The import is tried once, when ``m6_engine.ops`` is first imported; nothing below ever imports the
extension inside a forward. A missing or stale build is remembered with the reason, and a fused op
called without it raises :class:`ExtensionNotBuiltError` saying how to build it.
"""

import importlib

import torch  # noqa: F401  (loads libtorch, which m6_engine._C links against)

BUILD_HINT = (
    "build it from the repository root with `make install` "
    "(or `pip install --no-build-isolation -e .`; `M6_BUILD_CUDA=0` for a CPU-only build)"
)


class ExtensionNotBuiltError(RuntimeError):
    """A fused m6 op was called but m6_engine._C is not built or does not load."""


def _load():
    try:
        module = importlib.import_module("m6_engine._C")
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
