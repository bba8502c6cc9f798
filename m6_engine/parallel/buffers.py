"""Output buffers for the large tensors of a step (the head's logits), faulted in cheaply or reused.

On the CPU a tensor of more than 32 MiB is mapped by the C allocator on every allocation and
unmapped when freed, so each one is page-faulted afresh, 4 KiB at a time: for the (tokens, V/t)
logits of the output head (44 MB at 1056 tokens x 10624 columns) the faults cost more than
writing the values. Two remedies, both CPU-only (CUDA's caching allocator already reuses memory):

- :func:`empty_large`: ``torch.empty`` with the buffer's interior 2 MiB-aligned range advised to
  transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``), which fault 512x less often (the C++
  kernels go further and reuse their outputs' blocks: ``csrc/common/cpu_output_cache.h``). Only a
  hint on memory we own: where THP is disabled or the call is unavailable the buffer is a plain
  ``torch.empty``.
- :class:`ScratchPool`: a module keeps the storage of its last few large outputs and hands one
  out again once no tensor uses it any more (its storage's use count is back to the pool's own
  reference), so a buffer made for one micro-batch serves the next ones without a single fault.
  A buffer still in use (a micro-batch whose backward has not run) is never handed out.
"""

import ctypes
import math
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
MIN_ADVISED_BYTES = 8 << 20
"""Below this the allocator reuses freed heap memory anyway (and at most 2 huge pages would fit)."""
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Advise the interior 2 MiB-aligned range of a CPU tensor's memory to huge pages (a hint)."""
    if _MADVISE is None or tensor.device.type != "cpu" or tensor.nbytes < MIN_ADVISED_BYTES:
        return
    begin = tensor.data_ptr()
    first = (begin + HUGE_PAGE_BYTES - 1) & ~(HUGE_PAGE_BYTES - 1)
    last = (begin + tensor.nbytes) & ~(HUGE_PAGE_BYTES - 1)
    if last > first:
        _MADVISE(first, last - first, _MADV_HUGEPAGE)   # failure is harmless: the pages stay 4 KiB


def empty_large(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(shape)``, advised to huge pages when large and on the CPU (module docstring)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(out)
    return out


def _in_use_elsewhere(storage: torch.UntypedStorage) -> bool:
    """True while any tensor uses ``storage``; the pool's own reference counts once."""
    return torch._C._storage_Use_Count(storage._cdata) > 1


class ScratchPool:
    """Large CPU output buffers reused once free (module docstring); owned by the module whose
    outputs they hold. ``capacity`` buffers at most are kept (e.g. 1F1B's one live micro-batch on
    the last stage, plus one); on other devices and below ``MIN_ADVISED_BYTES`` it allocates."""

    def __init__(self, capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"ScratchPool: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._storages: list[torch.UntypedStorage] = []

    def empty(self, shape, *, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor of ``shape``: a free kept buffer, else a new one (kept while
        fewer than ``capacity`` are). Not a view: it may be modified in place like a fresh tensor."""
        device = torch.device(device)
        nbytes = math.prod(shape) * dtype.itemsize
        if device.type != "cpu" or nbytes < MIN_ADVISED_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        too_small = None                                   # a free kept buffer smaller than asked
        for i, storage in enumerate(self._storages):
            if _in_use_elsewhere(storage):
                continue
            if storage.nbytes() >= nbytes:
                return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, tuple(shape))
            too_small = i
        out = empty_large(shape, dtype=dtype, device=device)
        if len(self._storages) < self.capacity:
            self._storages.append(out.untyped_storage())
        elif too_small is not None:
            self._storages[too_small] = out.untyped_storage()
        return out

    @property
    def kept_bytes(self) -> int:
        return sum(s.nbytes() for s in self._storages)
