"""Multi-process test harness: run a function on N CPU ranks (gloo), as torchrun would launch them.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes with torchrun's
variables set (MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, ...), one
intra-op thread each, and calls ``fn(*args)`` in every one. ``fn`` must be importable (a module-level
function) and typically starts with :func:`init_state`, whose process groups carry a timeout
(``PG_TIMEOUT_S``), so a communication bug fails instead of hanging. The parent returns the list of
per-rank return values (pickled), or raises :class:`RankFailure` with the first failing rank's
traceback as soon as any rank raises, dies (e.g. a native abort) or the whole run exceeds
``timeout_s``; the remaining ranks are then terminated.

:class:`Checks` collects named assertion results inside a rank, so one launch can run many checks
and report each to its own pytest test.

Processes come from a ``forkserver`` that has imported torch once: on a small machine the
import, repeated per rank, would cost more than most tests. The server never computes, so the forked
ranks start with no thread pools; each sets one intra-op thread and leaves through ``os._exit``
after reporting (torch's interpreter teardown is slow and adds nothing here).
"""

import os
import pickle
import queue
import signal
import socket
import time
import traceback

import torch.multiprocessing

PG_TIMEOUT_S = 60.0
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "m6_engine.parallel",
            "m6_engine.model", "m6_engine.checkpoint"]


class RankFailure(AssertionError):
    """A rank raised, died or timed out; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_state(tp: int = 1, pp: int = 1):
    """``m6_engine.parallel.initialize`` on gloo with the harness's process-group timeout."""
    from m6_engine.parallel import initialize

    return initialize(tp, pp, backend="gloo", timeout=PG_TIMEOUT_S)


def _rank_main(fn, rank, world_size, port, torchrun_env, args, results):
    import torch

    torch.set_num_threads(1)
    if torchrun_env:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0")
    try:
        payload = (rank, True, pickle.dumps(fn(*args)))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        payload = (rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    results.put(payload)
    results.close()
    results.join_thread()  # the payload is in the pipe before the process vanishes
    os._exit(0)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} without reporting a result"


def run_ranks(fn, world_size: int, *args, timeout_s: float = 240.0, torchrun_env: bool = True) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return their results in rank order.

    ``torchrun_env=False`` (one rank only) leaves the torchrun variables unset, as in a plain
    ``python script.py`` run.
    """
    if not torchrun_env and world_size != 1:
        raise ValueError("torchrun_env=False is a single-process launch: world_size must be 1")
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, rank, world_size, port, torchrun_env, args, results))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in done and p.exitcode not in (None, 0):
                        raise RankFailure(f"rank {rank} of {world_size} {_describe_exit(p.exitcode)}")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(done))
                    raise RankFailure(f"ranks {missing} of {world_size} did not finish within "
                                      f"{timeout_s:.0f} s") from None
                continue
            if not ok:
                raise RankFailure(f"rank {rank} of {world_size} raised {payload}")
            done[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10 if len(done) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [done[r] for r in range(world_size)]


class Checks:
    """Named checks run inside a rank: ``checks.run(name, fn)``; failures are recorded, not raised."""

    def __init__(self):
        self.results: dict[str, str | None] = {}

    def run(self, name: str, fn, *args):
        try:
            fn(*args)
            self.results[name] = None
        except AssertionError:
            # Ranks import test modules without pytest's assertion rewriting: keep the traceback,
            # which shows the failing line.
            self.results[name] = traceback.format_exc(limit=-3)


def assert_checks(rank_results: list, name: str) -> None:
    """Assert check ``name`` passed on every rank that ran it (it must have run somewhere)."""
    outcomes = [(rank, r[name]) for rank, r in enumerate(rank_results) if name in r]
    assert outcomes, f"no rank ran check {name!r}"
    failures = [f"rank {rank}: {message}" for rank, message in outcomes if message is not None]
    assert not failures, "\n".join(failures)
