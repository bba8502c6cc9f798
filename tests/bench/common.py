"""Shared helpers of the benchmarks: timing, the machine's copy bandwidth, tables and JSON.

Benchmarks report figures; none of these helpers judges them.
"""

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, Sequence

import torch


def synchronize(device: str) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    The device is synchronised before and after every timed call, so each sample is one whole call.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_fns(fns: Dict[str, Callable[[], object]], device: str, warmup: int = 3,
             iters: int = 10) -> Dict[str, float]:
    """Median wall time in seconds of each of ``fns``, the calls interleaved round-robin.

    Interleaving puts the contenders through the same allocator and machine state (a run of one
    after the other lets whichever goes first pay the page faults of a fresh heap, or a noisy
    neighbour hit only one of them).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20, iters: int = 10) -> float:
    """The machine's copy bandwidth in GB/s (1e9 bytes), counting bytes read plus bytes written.

    Copies one ``nbytes`` fp32 tensor into another (``Tensor.copy_``, all threads), large enough
    to spill every cache; this is the yardstick the kernels' achieved bandwidth is divided by.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=iters)
    return 2 * nbytes / seconds / 1e9


def gbps(nbytes: int, seconds: float) -> float:
    """Achieved bandwidth in GB/s of moving ``nbytes`` in ``seconds``."""
    return nbytes / seconds / 1e9


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under a title as a fixed-width text table; floats get 3 significant digits."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) if text else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(out_dir: str, name: str, data: dict) -> str:
    """Write ``data`` to ``<out_dir>/<name>.json`` (folder created if needed); return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)   # a reader never sees half a result
    return path


def out_dir_main(run, description: str, argv=None) -> dict:
    """Command line of a benchmark whose ``run`` takes only the output folder: ``--out DIR``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="bench-results", help="folder for the JSON result")
    return run(parser.parse_args(argv).out)
