"""Host memory: large freed blocks stay mapped for the next allocation (glibc malloc, once a process).

glibc's malloc serves a block above its mmap threshold (32 MiB at most) with a fresh mapping and
unmaps it when freed, so every large CPU tensor is page-faulted and zero-filled afresh, 4 KiB at a
time. The output head's logits are such a tensor in every micro-batch (44 MB at 1056 tokens x
10564 columns): on the 2-core dev machine their faults cost ~20 ms a micro-batch (87 against
63 ms of CPU for the head's forward and weight-gradient matmuls around them).
:func:`keep_freed_blocks_mapped` raises the thresholds once, so blocks up
to ``MMAP_THRESHOLD_BYTES`` come from the heap and, freed, stay there for the next one: CUDA's
caching allocator does the same for device memory. It is a setting of the process's allocator,
below the ops: the Python path and its tensors are the same on every device (on a GPU job it
concerns host tensors only). The C++ kernels' outputs have their own cache
(``m6_engine.ops.cpu_output_cache_stats``).

A freed block serves the next request once freed neighbours have coalesced (glibc asks a little
more than the block for an aligned allocation): after the first few micro-batches, none faults.
Bounded: larger blocks still get their own mapping, and free memory above ``TRIM_THRESHOLD_BYTES``
at the heap's top goes back to the system. Without glibc (musl, macOS) nothing is changed.
"""

import ctypes

MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def keep_freed_blocks_mapped() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True when set. Idempotent: the
    settings are the process allocator's, so a second call changes nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):            # not glibc: its allocator's own policy stays
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both: with the default trim threshold (128 KiB) a freed block at the heap's top would go
    # straight back to the system.
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
