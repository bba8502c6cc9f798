"""Test-only helpers for running megatron-core on CPU ranks. Never imported by the engine."""

from megatron_ext.testing.cpu_shim import cpu_shim

__all__ = ["cpu_shim"]
