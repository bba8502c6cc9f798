"""Shared pytest set-up: the `cuda` marker (skipped unless a GPU and the CUDA kernels are present),
the `slow` marker (long multi-rank parity cases: `make test` deselects them with ``-m "not slow"``,
`make test-all` and a plain ``pytest`` run them), and poisoned allocations for tests that prove a
kernel writes every element of its output."""

import contextlib

import pytest
import torch
import torch.distributed as dist

import m6_engine.ops as ops


def cuda_ready() -> bool:
    """True when a GPU is visible and m6_engine._C was built with its CUDA kernels."""
    return torch.cuda.is_available() and ops.cuda_kernels_built()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels of m6_engine._C")
    config.addinivalue_line("markers", "slow: a long case `make test` leaves out (`make test-all` runs it)")


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and m6_engine._C built with M6_BUILD_CUDA=1")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_process_group_left_behind(request):
    """Fail the test that leaves a default process group in the pytest process.

    A group left by one test changes what later ones see (``initialize`` then reuses it instead
    of reading RANK / WORLD_SIZE), so the failure would show up in some unrelated test, by order.
    Tests that need groups run their ranks in child processes (tests/distributed.py).
    """
    was = dist.is_initialized()
    yield
    if dist.is_initialized() and not was:
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} left a default process group in the pytest process; "
                    "run its ranks through tests.distributed.run_ranks")


# Test ids of a device parameter; "cuda" carries the marker above.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@contextlib.contextmanager
def nan_filled_empty():
    """Within: every uninitialised tensor torch allocates (kernel outputs included) is NaN-filled.

    Uses torch's deterministic mode with ``fill_uninitialized_memory``; restores both on exit.
    A position a kernel forgets to write then stays NaN instead of being whatever was in memory.
    """
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
