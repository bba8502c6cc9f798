"""Control of the CPU kernels' output cache (``csrc/common/cpu_output_cache.h``).

The CPU kernels take outputs of 4 MiB and more from a cache of reused huge-page blocks instead of
fresh mappings, whose page faults cost more than the kernels' own writes. A block goes back to the
cache only when torch frees the last tensor using it. At most a limit of *free* bytes is kept
(default 1 GiB; ``M6_CPU_OUTPUT_CACHE_MB`` at start-up, :func:`set_cpu_output_cache_limit` later;
0 turns caching off), least recently freed evicted first: the CPU counterpart of
``torch.cuda.memory_stats`` / ``torch.cuda.empty_cache``.
"""

from typing import Dict

from m6_engine.ops._extension import require_extension


def cpu_output_cache_stats() -> Dict[str, int]:
    """Counters: limit_bytes, cached_bytes and cached_blocks (free, held by the cache),
    live_bytes (held by live tensors), hits and misses (large outputs served by a cached block /
    needing a new one)."""
    return require_extension().cpu_output_cache_stats()


def empty_cpu_output_cache() -> None:
    """Return every free cached block to the OS; blocks in use come back when their tensors die."""
    require_extension().empty_cpu_output_cache()


def set_cpu_output_cache_limit(limit_bytes: int) -> int:
    """Keep at most ``limit_bytes`` of free blocks (evicting down to it now); returns the old limit."""
    return require_extension().set_cpu_output_cache_limit(int(limit_bytes))
