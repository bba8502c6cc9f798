"""Shared helpers of the benchmarks: timing (wall clock, CUDA events), bandwidth, tables and JSON.

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


def time_fns_cuda(fns: Dict[str, Callable[[], object]], calls: int = 50, rounds: int = 5,
                  warmup: int = 3) -> Dict[str, float]:
    """Seconds per call of each of ``fns`` on the current CUDA device, timed with CUDA events.

    Each round queues ``calls`` back-to-back calls of one contender between two events (no host
    synchronisation inside, so launch gaps overlap with the previous call as they do in training)
    and divides the elapsed time by ``calls``; contenders alternate round by round, and the median
    of ``rounds`` rounds is returned. One call per synchronisation would time the launch latency
    and the host round trip along with the kernel.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_calls(fns: Dict[str, Callable[[], object]], device: str, iters: int = 10) -> Dict[str, float]:
    """Seconds per call of each of ``fns``: CUDA events over back-to-back calls on a GPU
    (:func:`time_fns_cuda`), interleaved wall-clock medians on the CPU (:func:`time_fns`)."""
    if torch.device(device).type == "cuda":
        return time_fns_cuda(fns, rounds=max(3, iters // 4))
    return time_fns(fns, device, iters=iters)


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


def quick_main(run, description: str, argv=None) -> dict:
    """Command line of a benchmark whose ``run`` takes the output folder and ``quick``:
    ``--out DIR`` and ``--quick`` (small sizes that check the plumbing, as its quick test runs)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="bench-results", help="folder for the JSON result")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the plumbing only")
    args = parser.parse_args(argv)
    return run(args.out, args.quick)
