"""The CPU kernels' output cache (csrc/common/cpu_output_cache.h, m6_engine.ops.output_cache).

Large outputs reuse freed blocks and never a block a live tensor holds; the limit bounds the free
bytes kept (0 = no caching); an output from the cache is an ordinary tensor; a bad limit is a clear
error. Each test sets the limit it needs and restores the old one.
"""

import io
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import m6_engine.ops as ops
from m6_engine.ops.reference import masked_softmax_reference

MIB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_limit():
    """Set the cache limit for one test (emptying the cache first); restores the old limit."""
    old = ops.set_cpu_output_cache_limit(ops.cpu_output_cache_stats()["limit_bytes"])
    ops.empty_cpu_output_cache()

    def set_limit(limit_bytes):
        ops.set_cpu_output_cache_limit(limit_bytes)

    yield set_limit
    ops.set_cpu_output_cache_limit(old)
    ops.empty_cpu_output_cache()


def _softmax(sq, sk, seed=0):
    """masked_softmax of a (1, 1, sq, sk) fp32 problem and its float64 reference."""
    scores = torch.randn(1, 1, sq, sk, generator=torch.Generator().manual_seed(seed))
    prefix, valid = torch.tensor([sk // 2]), torch.tensor([sk])
    return (ops.masked_softmax(scores, prefix, valid, 0.5),
            masked_softmax_reference(scores.double(), prefix, valid, 0.5))


def test_a_freed_block_is_reused_and_a_live_one_never(cache_limit):
    cache_limit(256 * MIB)
    first, _ = _softmax(1024, 2048)                      # 8 MiB
    address = first.data_ptr()
    before = ops.cpu_output_cache_stats()
    assert before["live_bytes"] == 8 * MIB and before["cached_bytes"] == 0
    del first
    assert ops.cpu_output_cache_stats()["cached_bytes"] == 8 * MIB
    second, exact = _softmax(1024, 2048, seed=1)
    assert second.data_ptr() == address, "a freed block of the same size class was not reused"
    torch.testing.assert_close(second.double(), exact, atol=1e-6, rtol=0)
    third, _ = _softmax(1024, 2048, seed=2)              # second is alive: a new block
    assert third.data_ptr() != address
    after = ops.cpu_output_cache_stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"] + 1
    assert after["live_bytes"] == 16 * MIB


def test_small_outputs_bypass_the_cache(cache_limit):
    before = ops.cpu_output_cache_stats()
    out, _ = _softmax(256, 512)                          # 0.5 MiB
    del out
    after = ops.cpu_output_cache_stats()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (before["hits"], before["misses"], 0)


def test_limit_bounds_the_free_bytes(cache_limit):
    cache_limit(10 * MIB)
    a, _ = _softmax(1024, 2048)                          # 8 MiB
    b, _ = _softmax(1024, 1536)                          # 6 MiB
    del a
    assert ops.cpu_output_cache_stats()["cached_bytes"] == 8 * MIB
    del b                                                # 14 MiB > 10: the older block goes
    stats = ops.cpu_output_cache_stats()
    assert stats["cached_bytes"] == 6 * MIB and stats["cached_blocks"] == 1
    ops.empty_cpu_output_cache()
    assert ops.cpu_output_cache_stats()["cached_bytes"] == 0
    cache_limit(0)                                       # off: nothing is kept
    c, exact = _softmax(1024, 2048)
    torch.testing.assert_close(c.double(), exact, atol=1e-6, rtol=0)
    del c
    assert ops.cpu_output_cache_stats()["cached_bytes"] == 0


def test_layer_norm_outputs_use_it_too(cache_limit):
    x = torch.randn(2048, 1024)                          # 8 MiB
    w, b = torch.ones(1024), torch.zeros(1024)
    before = ops.cpu_output_cache_stats()["misses"]
    y = ops.layer_norm(x, w, b)
    assert ops.cpu_output_cache_stats()["misses"] == before + 1
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (1024,), w, b), atol=1e-5, rtol=0)


def test_a_cached_output_is_an_ordinary_tensor(cache_limit):
    out, exact = _softmax(1024, 2048)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), out, atol=0, rtol=0)
    out.resize_(2, 1024, 2048)                           # the storage is resizable, values kept
    torch.testing.assert_close(out[0].double(), exact[0, 0], atol=1e-6, rtol=0)
    out.resize_(16)
    assert out.shape == (16,)


def _child_uses_the_cache(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child cannot use the parent's OpenMP pool
    out, exact = _softmax(1024, 2048)
    queue.put(bool(torch.allclose(out.double(), exact, atol=1e-6)))


def test_a_forked_child_can_use_it(cache_limit):
    held, _ = _softmax(1024, 2048)                       # a live block and a cached one at fork time
    freed, _ = _softmax(1024, 1536)
    del freed
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_uses_the_cache, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) is True
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    del held


def test_bad_limits_are_clear_errors():
    with pytest.raises(ValueError, match="must be >= 0 bytes, got -1"):
        ops.set_cpu_output_cache_limit(-1)
    code = ("import torch, m6_engine.ops as o\n"
            "o.masked_softmax(torch.zeros(1, 1, 1024, 2048), torch.tensor([1]), torch.tensor([2048]))\n")
    env = {**os.environ, "M6_CPU_OUTPUT_CACHE_MB": "lots", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "M6_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0 (0 turns the cache off), got 'lots'" \
        in result.stderr
