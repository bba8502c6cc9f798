"""Progress bars of the offline jobs (cleaning, preprocessing, sample indexes, checkpoint conversion).

One rule for all of them: a tqdm bar on stderr with count, rate and ETA, drawn only when the
caller wants progress *and* stderr is a terminal, so a job run under SLURM or redirected to a log
file writes no carriage-return noise there (tqdm's ``disable=None``).
"""

import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, file=None, **options) -> tqdm:
    """``tqdm(iterable, desc=desc, **options)`` on stderr (or ``file``), shown only when ``enabled``
    and that stream is a terminal; usable as an iterator or, with ``total=``, as a context manager
    updated by hand."""
    return tqdm(iterable, desc=desc, file=file if file is not None else sys.stderr,
                disable=None if enabled else True, **options)
