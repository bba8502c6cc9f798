"""Does the installed torch have kernels for this machine's GPUs? The launch scripts ask before
starting a multi-node job, so a missing architecture is one clear line, not "no kernel image is
available for execution on the device" from every rank after the rendezvous.

A torch build runs on a GPU of compute capability X.Y when its ``torch.cuda.get_arch_list()`` has
``sm_XY``, or a ``compute_AB`` (PTX, compiled by the driver) with AB <= XY. The CUDA 13 builds (the
one ``make install`` takes) and the CUDA 12.8 builds of torch 2.11+ start at sm_75: a V100 (sm_70,
the paper's cluster) needs the CUDA 12.6 build, which still ships sm_70, and m6_engine's extension
built for it with a CUDA 12 toolkit and ``TORCH_CUDA_ARCH_LIST=7.0`` (README, "The 10B M6-large").

``python -m m6_engine.gpu_support`` checks every visible GPU: exit status 0 when all are covered,
2 with the reason and the fix otherwise.
"""

import sys

V100_FIX = ("install a CUDA 12.6 build of torch, the last that ships sm_70 (e.g. `pip install "
            "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu126`), then rebuild "
            "m6_engine._C for it with a CUDA 12 toolkit: `CUDA_HOME=/usr/local/cuda-12.6 "
            "TORCH_CUDA_ARCH_LIST=7.0 python setup.py build_ext --inplace`")


def _arch_number(entry: str) -> tuple[str, int] | None:
    kind, _, number = entry.partition("_")
    digits = "".join(ch for ch in number if ch.isdigit())
    return (kind, int(digits)) if kind in ("sm", "compute") and digits else None


def unsupported_reason(name: str, capability: tuple[int, int], arch_list: list[str],
                       torch_version: str, cuda_version: str | None) -> str | None:
    """Why torch (``arch_list``, its version and CUDA version) cannot run on GPU ``name`` of
    ``capability`` (major, minor), with the fix; None when it can."""
    target = capability[0] * 10 + capability[1]
    parsed = [p for p in (_arch_number(a) for a in arch_list) if p is not None]
    if any(kind == "sm" and n == target for kind, n in parsed):
        return None
    if any(kind == "compute" and n <= target for kind, n in parsed):
        return None
    fix = V100_FIX if target < 75 else ("install a torch build whose torch.cuda.get_arch_list() "
                                        f"lists sm_{target}")
    return (f"torch {torch_version} (CUDA {cuda_version}) has no kernels for {name} (sm_{target}): it "
            f"ships {', '.join(arch_list) or 'none'}; {fix}")


def check_visible_gpus() -> list[str]:
    """The reasons (one per unsupported GPU model) for the GPUs this process sees."""
    import torch

    if not torch.cuda.is_available():
        return [f"no CUDA GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda}): "
                "the M6-large launch needs GPUs"]
    reasons, seen = [], set()
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        capability = torch.cuda.get_device_capability(index)
        if (name, capability) in seen:
            continue
        seen.add((name, capability))
        reason = unsupported_reason(name, capability, torch.cuda.get_arch_list(), torch.__version__,
                                    torch.version.cuda)
        if reason:
            reasons.append(reason)
    return reasons


def main() -> int:
    reasons = check_visible_gpus()
    for reason in reasons:
        print(f"error: {reason}", file=sys.stderr)
    return 2 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
