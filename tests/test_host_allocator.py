"""The host allocator setting (m6_engine.host_allocator): once it is installed a large CPU tensor,
allocated and freed micro-batch after micro-batch as the head's logits are, reuses mapped memory
instead of page-faulting afresh. Run in a fresh interpreter, so the test process's allocator and
the figures are this test's own."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LOGITS_LOOP = """
import resource, sys, torch
from m6_engine.host_allocator import keep_freed_blocks_mapped
if sys.argv[1] == "installed":
    assert keep_freed_blocks_mapped() and keep_freed_blocks_mapped()   # a second call: a no-op
def faults_of_one_microbatch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(1056, 10564).fill_(1.0)                  # the race's logits: 44 MB, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# glibc asks a little more than a freed block for an aligned one, so the first few grow the heap
# until freed neighbours coalesce: the steady state is what a training run lives in.
print(max([faults_of_one_microbatch() for _ in range(16)][12:]))
"""
PAGES = 1056 * 10564 * 4 // 4096


def _steady_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _LOGITS_LOOP, mode], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_freed_logits_are_reused_without_page_faults():
    assert _steady_faults("default") > PAGES // 2          # glibc maps and unmaps each one
    assert _steady_faults("installed") < PAGES // 100
