"""m6-engine: a Megatron-style training engine for M6 (multimodal image + Chinese text).

Importing the package never needs the compiled extension; the fused ops say how to build it when
it is missing (see ``m6_engine.ops``).
"""

__version__ = "0.1.0"

# Supported torch: 2.11 to 2.15 (README, "Building the extension"). Older ones lack DeviceMesh /
# DTensor / DCP behaviour the engine relies on and fail far from the cause; say so here, cheaply
# (the installed distribution's version, without importing torch).
TORCH_MIN, TORCH_MAX = (2, 11), (2, 15)


def _torch_version_problem(version):
    """An error message when torch ``version`` (e.g. "2.10.0+cpu") is older than TORCH_MIN, else None."""
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:   # a version string we cannot read: do not refuse on a guess
        return None
    if major_minor < TORCH_MIN:
        return (f"m6_engine needs torch {TORCH_MIN[0]}.{TORCH_MIN[1]} to {TORCH_MAX[0]}.{TORCH_MAX[1]}; "
                f"torch {version} is installed")
    return None


def _installed_torch_version():
    import importlib.metadata
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None   # no torch: the first `import torch` says so


_problem = _installed_torch_version()
_problem = _problem and _torch_version_problem(_problem)
if _problem:
    raise ImportError(_problem)
del _problem
