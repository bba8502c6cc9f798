"""Checksums taken while writing, and asynchronous checkpoints (``m6_engine.checkpoint.async_save``).

- Digests: a synchronous and an asynchronous save at tp = 2 run with every way of reading a
  checkpoint file made to fail (``file_digest``, ``open`` / ``io.open`` / ``os.open`` for reading,
  but the ``complete`` manifests pruning reads), and the crc32 and sizes they record are the files'.
- Same checkpoint: a synchronous and an asynchronous save of one state at (tp, dp) = (2, 2) with
  ZeRO-1 (DTensor shards, the vocab-parallel weight's chunks, the optimizer's pieces) store the same
  keys, global shapes, dtypes and chunks, and load back the same tensors.
- Snapshot: a save whose write is held until after the next optimizer step (which updates the
  weights and moments in place) still holds the weights and moments of before that step.
- One at a time: a second save waits for the first, which is published before the second writes.
- Errors: a write failing on one rank (no space left on device, injected mid-file) raises a
  CheckpointError naming the step and the folder on every rank, at the next save and at ``wait``;
  a save directory that cannot be created too; the earlier checkpoints stay as they were.

The model is tests/test_checkpoint.py's tiny M6 stage and MixedPrecisionOptimizer.
"""

import builtins
import errno
import io
import os
import threading
from pathlib import Path

import pytest
import torch

from m6_engine.checkpoint import (
    AsyncCheckpointer, CheckpointError, latest_checkpoint, load_checkpoint, read_manifest,
    save_checkpoint,
)
from m6_engine.checkpoint import digests as digests_module
from m6_engine.checkpoint import folders
from m6_engine.checkpoint import save as save_module
from m6_engine.checkpoint.folders import MANIFEST, file_digest
from tests.distributed import init_state, run_ranks
from tests.test_checkpoint import EXTRA, assemble, assert_same_tensors, build, local_state, take_steps

TIMEOUT_S = 60.0


def _checkpointer(state):
    return AsyncCheckpointer(state.device, timeout_s=TIMEOUT_S)


# ---- digests: no file is read back --------------------------------------------------------------

class _ReadRefused(AssertionError):
    pass


def _refusing_reads(root: Path):
    """Patches making every read of a checkpoint file under ``root`` raise (the ``complete``
    manifests aside, which pruning reads to find the complete checkpoints); returns an undo."""
    root = os.path.realpath(root)
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open
    real_digest = folders.file_digest

    def refused(path) -> bool:
        path = os.path.realpath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else ""
        return path.startswith(root + os.sep) and os.path.basename(path) != MANIFEST and os.path.isfile(path)

    def guarded_open(file, mode="r", *args, **kwargs):
        if "r" in mode and "+" not in mode and refused(file):
            raise _ReadRefused(f"a save read {file} back")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & os.O_ACCMODE == os.O_RDONLY and refused(path):
            raise _ReadRefused(f"a save opened {path} for reading")
        return real_os_open(path, flags, *args, **kwargs)

    def no_digest(path):
        raise _ReadRefused(f"a save re-read {path} for its digest")

    builtins.open, io.open, os.open, folders.file_digest = guarded_open, guarded_open, guarded_os_open, no_digest

    def undo():
        builtins.open, io.open, os.open, folders.file_digest = real_open, real_io_open, real_os_open, real_digest

    return undo


def _recorded_and_actual(folder: Path) -> dict:
    manifest = read_manifest(folder)
    listed = {name: (entry["bytes"], entry["crc32"]) for name, entry in manifest["files"].items()}
    actual = {p.name: file_digest(p) for p in folder.iterdir() if p.name != MANIFEST}
    return {"recorded": listed, "actual": actual}


def _saves_without_reading(root):
    state = init_state(tp=2)
    model, optimizer = build(state, seed=1)
    take_steps(model, optimizer, 2)
    checkpointer = _checkpointer(state)
    root = Path(root)
    # Two saves per directory, so the second also prunes (keep_last = 1), which reads manifests.
    undo = _refusing_reads(root)
    try:
        guard_works = False
        if state.rank == 0:
            (root / "probe").mkdir(parents=True, exist_ok=True)
            (root / "probe" / "shard.distcp").write_bytes(b"x")
            try:
                with open(root / "probe" / "shard.distcp", "rb"):
                    pass
            except _ReadRefused:
                guard_works = True
        for step in (1, 2):
            save_checkpoint(root / "sync", step, model=model, optimizer=optimizer, state=state,
                            extra=EXTRA, keep_last=1, attachments={"vocab.txt": b"[PAD]\n[UNK]\n"})
            checkpointer.save(root / "async", step, model=model, optimizer=optimizer, state=state,
                              extra=EXTRA, keep_last=1, attachments={"vocab.txt": b"[PAD]\n[UNK]\n"})
            checkpointer.wait()
    finally:
        undo()
    return {"guard_works": guard_works,
            "sync": _recorded_and_actual(root / "sync" / "step_000002"),
            "async": _recorded_and_actual(root / "async" / "step_000002"),
            "listings": {kind: sorted(os.listdir(root / kind)) for kind in ("sync", "async")}}


@pytest.fixture(scope="module")
def without_reading(tmp_path_factory):
    return run_ranks(_saves_without_reading, 2, str(tmp_path_factory.mktemp("digests")))[0]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_digests_are_taken_while_writing_and_are_the_files(without_reading, kind):
    assert without_reading["guard_works"]       # a read of a shard would have failed the save
    files = without_reading[kind]
    assert files["recorded"] == files["actual"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "vocab.txt"} <= set(files["recorded"])
    assert without_reading["listings"][kind] == ["latest", "step_000002"]


def test_a_stream_that_seeks_is_refused(tmp_path):
    stream = digests_module.DigestingStream(io.BytesIO(), on_close=lambda size, crc: None)
    stream.write(b"abc")
    assert not stream.seekable() and stream.tell() == 3
    with pytest.raises(io.UnsupportedOperation):
        stream.seek(0)
    with pytest.raises(ValueError, match="mode 'ab'"):
        with digests_module.DigestingFileSystem().create_stream(tmp_path / "f", "ab"):
            pass


# ---- the same checkpoint either way -------------------------------------------------------------

def _stored_layout(folder):
    """{key: (global size, dtype, sorted chunks (offsets, sizes))} of a checkpoint's tensors, and
    the non-tensor keys."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {key: (tuple(m.size), m.properties.dtype,
                  sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
            if isinstance(m, TensorStorageMetadata) else "bytes" for key, m in stored.items()}


def _sync_and_async_of_one_state(root):
    state = init_state(tp=2)
    model, optimizer = build(state, seed=1, perturb=True, sharding=True)
    take_steps(model, optimizer, 3)
    saved = local_state(model, optimizer, state)
    sync = save_checkpoint(Path(root) / "sync", 3, model=model, optimizer=optimizer, state=state, extra=EXTRA)
    checkpointer = _checkpointer(state)
    background = checkpointer.save(Path(root) / "async", 3, model=model, optimizer=optimizer, state=state,
                                   extra=EXTRA)
    checkpointer.wait()
    loaded = {}
    for kind, folder in (("sync", sync), ("async", background)):
        fresh, fresh_optimizer = build(state, seed=2, sharding=True)
        result = load_checkpoint(folder, model=fresh, optimizer=fresh_optimizer, state=state)
        loaded[kind] = {"state": local_state(fresh, fresh_optimizer, state), "extra": result.extra,
                        "manifest": read_manifest(folder)}
    return {"saved": saved, "loaded": loaded,
            "layout": {kind: _stored_layout(folder) for kind, folder in (("sync", sync), ("async", background))}}


@pytest.fixture(scope="module")
def sync_and_async(tmp_path_factory):
    return run_ranks(_sync_and_async_of_one_state, 4, str(tmp_path_factory.mktemp("same")))


def test_async_and_sync_saves_store_the_same_chunks(sync_and_async):
    layout = sync_and_async[0]["layout"]
    assert layout["sync"] == layout["async"]
    assert any(k.startswith("optimizer.") for k in layout["sync"]) and "model.embedding.word.weight" in layout["sync"]


def test_async_and_sync_saves_load_back_the_same_tensors(sync_and_async):
    saved = {part: assemble([r["saved"] for r in sync_and_async], part, loaded=False) for part in ("params", "optim")}
    for kind in ("sync", "async"):
        for part in ("params", "optim"):
            assert_same_tensors(assemble([r["loaded"][kind]["state"] for r in sync_and_async], part), saved[part])
        for r in sync_and_async:
            assert r["loaded"][kind]["extra"] == EXTRA
            assert r["loaded"][kind]["state"]["scalars"] == r["saved"]["scalars"]
    manifests = {kind: {k: v for k, v in sync_and_async[0]["loaded"][kind]["manifest"].items()
                        if k not in ("saved_unix", "files")} for kind in ("sync", "async")}
    assert manifests["sync"] == manifests["async"]


# ---- the snapshot, one save at a time, errors ---------------------------------------------------

class _HeldWriter(save_module.DigestingWriter):
    """Writes only once ``release`` is set (then records what it saw in ``log``)."""

    release = threading.Event()
    log: list = []

    def write_data(self, plan, planner):
        self.release.wait()
        self.log.append(("write", Path(self.path).name, latest_checkpoint(Path(self.path).parent)))
        return super().write_data(plan, planner)


def _held_saves(checkpointer, save):
    """Run ``save()`` with saves' writes held on ``_HeldWriter.release`` (not yet set)."""
    _HeldWriter.release.clear()
    _HeldWriter.log.clear()
    real, save_module.DigestingWriter = save_module.DigestingWriter, _HeldWriter
    try:
        return save()
    finally:
        save_module.DigestingWriter = real


def _snapshot_before_the_next_step(root, state):
    model, optimizer = build(state, seed=1, perturb=True)
    take_steps(model, optimizer, 2)
    before = local_state(model, optimizer, state)
    checkpointer = _checkpointer(state)

    def save_then_step():
        checkpointer.save(root, 2, model=model, optimizer=optimizer, state=state)
        in_flight_during_step = not checkpointer.in_flight.outcome.done()
        take_steps(model, optimizer, 1)          # in place: weights, masters, moments
        _HeldWriter.release.set()
        checkpointer.wait()
        return in_flight_during_step

    in_flight_during_step = _held_saves(checkpointer, save_then_step)
    after = local_state(model, optimizer, state)
    # The weights alone first: loading the optimizer writes its masters into fp32 weights.
    weights_only, unused_optimizer = build(state, seed=2)
    load_checkpoint(root, model=weights_only, state=state)
    fresh, fresh_optimizer = build(state, seed=2)
    load_checkpoint(root, model=fresh, optimizer=fresh_optimizer, state=state)
    loaded = local_state(fresh, fresh_optimizer, state)
    loaded["params"] = local_state(weights_only, unused_optimizer, state)["params"]
    return {"in_flight_during_step": in_flight_during_step, "before": before, "after": after,
            "loaded": loaded}


def _one_at_a_time(root, state):
    model, optimizer = build(state, seed=1)
    checkpointer = _checkpointer(state)
    wait = checkpointer.wait

    def wait_releasing():           # the second save's wait is what lets the first write go on
        _HeldWriter.release.set()
        return wait()

    checkpointer.wait = wait_releasing

    def two_saves():
        checkpointer.save(root, 1, model=model, optimizer=optimizer, state=state)
        first_in_flight = not checkpointer.in_flight.outcome.done()
        checkpointer.save(root, 2, model=model, optimizer=optimizer, state=state)
        checkpointer.wait()
        return first_in_flight

    first_in_flight = _held_saves(checkpointer, two_saves)
    return {"first_in_flight": first_in_flight,
            "log": [(w, "-".join(f.split("-")[:2]), str(p)) for w, f, p in _HeldWriter.log],
            "root": str(root)}


def _no_space_on_rank1(step):
    """Make rank 1's writes into step ``step``'s folder fail mid-file; returns an undo."""
    import torch.distributed as dist

    real = digests_module.DigestingStream.write
    folder = f".tmp-{folders.step_dirname(step)}-"

    def write(self, data):
        if dist.get_rank() == 1 and folder in str(getattr(self, "_raw").name) and self.size > 0:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(self, data)

    digests_module.DigestingStream.write = write
    return lambda: setattr(digests_module.DigestingStream, "write", real)


def _error_text(fn):
    try:
        fn()
    except CheckpointError as error:
        return str(error)
    return None


def _failures(root, state):
    model, optimizer = build(state, seed=1)
    checkpointer = _checkpointer(state)
    checkpointer.save(root, 1, model=model, optimizer=optimizer, state=state, extra={"n": 1})
    checkpointer.wait()
    undo = _no_space_on_rank1(2)
    try:
        checkpointer.save(root, 2, model=model, optimizer=optimizer, state=state, extra={"n": 2})
        at_next_save = _error_text(lambda: checkpointer.save(root, 3, model=model, optimizer=optimizer,
                                                             state=state, extra={"n": 3}))
        listing_after_failure = sorted(os.listdir(root))
        checkpointer.save(root, 3, model=model, optimizer=optimizer, state=state, extra={"n": 3})
        checkpointer.wait()
    finally:
        undo()
    listing_after_recovery = sorted(os.listdir(root))
    undo = _no_space_on_rank1(4)
    try:
        checkpointer.save(root, 4, model=model, optimizer=optimizer, state=state, extra={"n": 4})
        at_wait = _error_text(checkpointer.wait)
    finally:
        undo()
    fresh, fresh_optimizer = build(state, seed=2)
    loaded = load_checkpoint(root, model=fresh, optimizer=fresh_optimizer, state=state)
    not_a_folder = Path(root) / "a-file"
    not_a_folder.touch()
    checkpointer.save(not_a_folder / "ckpt", 5, model=model, optimizer=optimizer, state=state)
    uncreatable = _error_text(checkpointer.wait)
    return {"at_next_save": at_next_save, "at_wait": at_wait, "uncreatable": uncreatable,
            "listing_after_failure": listing_after_failure, "listing_after_recovery": listing_after_recovery,
            "loaded_step": loaded.step, "loaded_extra": loaded.extra}


def _two_ranks(root):
    state = init_state()
    root = Path(root)
    return {"snapshot": _snapshot_before_the_next_step(root / "snapshot", state),
            "one_at_a_time": _one_at_a_time(root / "one_at_a_time", state),
            "failures": _failures(root / "failures", state)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_two_ranks, 2, str(tmp_path_factory.mktemp("async")))


def test_a_held_write_still_saves_the_weights_of_before_the_next_step(two_ranks):
    for r in two_ranks:
        out = r["snapshot"]
        assert out["in_flight_during_step"]
        for part in ("params", "optim"):
            assert_same_tensors(out["loaded"][part], out["before"][part])
            changed = [n for n, t in out["after"][part].items() if not torch.equal(t, out["before"][part][n])]
            assert changed, f"the step changed no {part}: the test could not tell a late snapshot"
        assert out["loaded"]["scalars"] == out["before"]["scalars"] != out["after"]["scalars"]


def test_a_second_save_waits_for_the_first_to_be_published(two_ranks):
    for r in two_ranks:
        out = r["one_at_a_time"]
        assert out["first_in_flight"]
        root = out["root"]
        # The second save wrote only once the first was published (latest named it).
        assert out["log"] == [("write", ".tmp-step_000001", "None"),
                              ("write", ".tmp-step_000002", f"{root}/step_000001")]
        assert latest_checkpoint(root) == Path(root) / "step_000002"


def test_a_failed_background_write_raises_on_every_rank_naming_step_and_folder(two_ranks, tmp_path):
    for r in two_ranks:
        out = r["failures"]
        for where, step in (("at_next_save", 2), ("at_wait", 4)):
            message = out[where]
            assert message is not None, where
            assert f"of step {step}" in message and f".tmp-step_00000{step}-" in message, message
            assert f"step_00000{step}" in message and "untouched" in message, message
            assert "No space left on device (injected)" in message and "rank 1" in message, message
        stale, *rest = out["listing_after_failure"]
        assert stale.startswith(".tmp-step_000002-") and rest == ["latest", "step_000001"], out
        # The next save published and cleared what the failed one left behind.
        assert out["listing_after_recovery"] == ["latest", "step_000001", "step_000003"]
        assert (out["loaded_step"], out["loaded_extra"]) == (3, {"n": 3})
        assert "a-file" in out["uncreatable"] and "rank 0" in out["uncreatable"] \
            and "rank 1" in out["uncreatable"], out["uncreatable"]
