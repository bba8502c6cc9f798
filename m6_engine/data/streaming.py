"""Streaming helpers of the data CLIs: JSON-lines read in chunks, an ordered, bounded process-pool
map, and files that appear under their final name only once complete.

Both clean and preprocess read inputs of any size with bounded memory: the parent reads lines
lazily, a pool of worker processes handles chunks, and the results come back in input order, so
what is written never depends on the number of workers.
"""

import collections
import contextlib
import os
import tempfile
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_line_chunks(inputs: Sequence[Path], chunk_lines: int) -> Iterator[Tuple[int, List[bytes]]]:
    """``(input index, up to chunk_lines raw lines)`` over the files in order; blank lines are skipped.

    Lines stay bytes: decoding (and counting what does not decode) is the workers' job.
    """
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
    for source, path in enumerate(inputs):
        with open(path, "rb") as f:
            lines: List[bytes] = []
            for line in f:
                if line.strip():
                    lines.append(line)
                if len(lines) >= chunk_lines:
                    yield source, lines
                    lines = []
            if lines:
                yield source, lines


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes, in order, at most ``2 * workers`` items in flight.

    ``Pool.imap`` would read ``items`` ahead without limit (its feeder thread drains the iterator),
    holding a whole corpus in memory; here an item is submitted only when a slot frees up.
    ``fn`` and the items are pickled to the workers. Workers are forked where the platform can
    (spawn elsewhere): a spawned worker re-imports the entry module, and for ``python -m
    m6_engine.data.preprocess`` that means torch, seconds per worker. The forked workers never
    call torch or OpenMP, so the parent's threads (torch's pool, tqdm's monitor) cannot deadlock
    them. ``workers == 1`` runs in this process.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        yield from map(fn, items)
        return
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with get_context(method).Pool(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it to ``path`` when the block ends
    normally, delete it when the block raises. Readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; data files are for anyone who may read the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
