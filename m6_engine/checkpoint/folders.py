"""The on-disk protocol of a checkpoint directory: atomic publication, manifest, ``latest``, pruning.

A checkpoint directory ``ckpt_dir`` holds::

    latest                    "step_000123": the checkpoint published last (replaced atomically)
    step_000100/              one complete checkpoint
        .metadata             DCP's global metadata: keys, global shapes, where each chunk lives
        __<rank>_<i>.distcp   the chunks rank <rank> wrote
        complete              the manifest (JSON), written last: step, layout, config, and the
                              size and crc32 of every other file
    .tmp-step_000123-<id>/    a save in progress, or one that died: never loaded

A save writes everything into a ``.tmp-*`` folder, then ``complete`` (temp file + ``os.replace``),
renames the folder to ``step_<step>`` and only then replaces ``latest``. Each step is atomic on a
POSIX file system, so at any instant every ``step_*`` folder with a ``complete`` file is whole, and
a job killed at any point leaves the previous checkpoints loadable. A folder without ``complete``
(or with a file whose size or checksum differs from the manifest) is refused with an error that
names the file. Only one job may write to a checkpoint directory at a time: a successful save
removes the ``.tmp-*`` folders of saves that died.

The sizes and crc32 in the manifest are taken from the bytes as they are written (``digests``),
never by reading the files back; a load checks them (:func:`check_sizes`, :func:`check_checksums`).
An asynchronous save (``async_save``) takes the same steps from a background thread while training
goes on, so a job killed at any moment of it (mid-write, or between the manifest and the rename)
leaves the previous checkpoints as they were and ``latest`` naming one of them.
"""

import json
import os
import re
import shutil
import zlib
from pathlib import Path

MANIFEST = "complete"
LATEST = "latest"
FORMAT = "m6-engine-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, found or loaded; the message says which and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint where one was asked for."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint folder is incomplete, truncated or damaged; the message names the file."""


def step_dirname(step: int) -> str:
    """Folder name of the checkpoint of ``step``: step_000123 (more digits past 999999)."""
    return f"step_{step:06d}"


def step_of(folder: Path) -> int | None:
    """The step a ``step_*`` folder name encodes, else None."""
    match = _STEP_DIR.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def tmp_dirname(step: int, token: str) -> str:
    return f"{_TMP_PREFIX}{step_dirname(step)}-{token}"


def file_digest(path: Path) -> tuple[int, int]:
    """(size in bytes, crc32) of a file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the whole new one, never part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the ``complete`` marker: the last file of a checkpoint."""
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; CheckpointCorruptError when absent or unreadable."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointCorruptError(f"checkpoint {folder} is incomplete: it has no '{MANIFEST}' "
                                     "marker (its save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(f"manifest {path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path} is not an m6-engine checkpoint manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointCorruptError(f"{path} has format version {manifest.get('version')}; this "
                                     f"m6-engine reads version {FORMAT_VERSION}")
    missing = [k for k in ("step", "layout", "files") if k not in manifest]
    if missing:
        raise CheckpointCorruptError(f"manifest {path} lacks the fields {missing}")
    return manifest


def check_sizes(folder: Path, manifest: dict) -> list[str]:
    """Problems with the files the manifest lists (missing, or not the recorded size)."""
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing (the manifest lists it)")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path} is truncated or was modified: {path.stat().st_size} bytes, "
                            f"the manifest says {entry['bytes']}")
    return problems


def check_checksums(folder: Path, manifest: dict, names: list[str]) -> list[str]:
    """Problems with the crc32 of the listed files ``names`` (a share of the manifest's files)."""
    problems = []
    for name in names:
        path, entry = folder / name, manifest["files"][name]
        try:
            size, crc = file_digest(path)
        except OSError as error:
            problems.append(f"{path} cannot be read: {error}")
            continue
        if (size, crc) != (entry["bytes"], entry["crc32"]):
            problems.append(f"{path} is corrupt: crc32 {crc:08x} over {size} bytes, the manifest "
                            f"says {entry['crc32']:08x} over {entry['bytes']} bytes")
    return problems


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``step_*`` folders of ``ckpt_dir`` with a readable manifest, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        step = step_of(entry)
        if step is None or not entry.is_dir():
            continue
        try:
            read_manifest(entry)
        except CheckpointError:
            continue
        found.append((step, entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names when it is complete, else the
    complete ``step_*`` folder with the highest step; None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if step_of(Path(name)) is not None and Path(name).name == name:
        try:
            read_manifest(ckpt_dir / name)
            return ckpt_dir / name
        except CheckpointError:
            pass   # missing or incomplete: fall back to the newest complete folder
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final`` and point ``latest`` at it.

    A folder already at ``final`` (the same step saved again) is moved aside first and deleted
    after; in between, ``latest`` may name a missing folder, which readers skip.
    """
    old = None
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{tmp.name.rsplit('-', 1)[-1]}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    write_atomic(final.parent / LATEST, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int | None, current: Path) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last`` (never ``current``) and the
    leftovers of saves that died; return the checkpoints deleted."""
    for entry in ckpt_dir.iterdir():
        if entry.is_dir() and entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last is None:
        return []
    doomed = [p for p in complete_checkpoints(ckpt_dir)[:-keep_last] if p != current]
    for path in doomed:
        # The marker goes first, so a deletion cut short leaves an incomplete folder, never one
        # that looks complete with files missing.
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed
