"""Install the default vocab: bert-base-chinese's 21128-entry ``vocab.txt`` (the M6 paper's).

The file is not committed. The PyPI wheel ``cn-clip==1.6.0`` carries the identical file
(``cn_clip/clip/vocab.txt``, md5 3b5b76c4aef48ecf8cb3abaafe960f09), so this step runs
``pip download --no-deps`` for that wheel into a temporary folder, reads just that member out of
the zip, checks its md5, writes it beside the destination under a temporary name and renames it
into place (atomic: the destination is either absent, the old file, or the whole checked file).
cn-clip itself is never installed (it pins old dependencies).

A destination that already holds the right md5 is left alone (no download): the step is
idempotent. Any failure (pip, a wheel without the member, a wrong md5) raises
:class:`VocabFetchError` saying what went wrong, and leaves the destination untouched.

Usage: ``python -m m6_engine.data.vocab_fetch [--dest PATH]`` (``make install`` runs it).
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent.parent / "_data" / "vocab.txt"
"""Where the default vocab lives: ``m6_engine/_data/vocab.txt`` (git-ignored)."""


@dataclass(frozen=True)
class VocabSource:
    """A vocab file inside a wheel on a package index."""

    requirement: str
    """What ``pip download`` fetches, pinned (``name==version``)."""
    member: str
    """Path of the vocab inside the wheel's zip."""
    md5: str
    """Hex md5 of the member's bytes; anything else is refused."""


DEFAULT_SOURCE = VocabSource(requirement="cn-clip==1.6.0", member="cn_clip/clip/vocab.txt",
                             md5="3b5b76c4aef48ecf8cb3abaafe960f09")


class VocabFetchError(RuntimeError):
    """The vocab could not be fetched or did not check out."""


def file_md5(path: Path) -> str:
    """Hex md5 of a file's bytes."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def download_wheel(requirement: str, into_dir: Path) -> Path:
    """``pip download --no-deps --only-binary=:all: <requirement>`` into ``into_dir``; the wheel's path.

    Uses this interpreter's pip and its configuration (index, find-links). Raises
    :class:`VocabFetchError` with pip's last output lines when pip fails or leaves no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(into_dir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise VocabFetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(Path(into_dir).glob("*.whl"))
    if len(wheels) != 1:
        raise VocabFetchError(f"`pip download {requirement}` left {len(wheels)} wheels in {into_dir}, "
                              f"expected 1: {[w.name for w in wheels]}")
    return wheels[0]


def read_member(wheel: Path, source: VocabSource) -> bytes:
    """The bytes of ``source.member`` in ``wheel``, refused unless their md5 is ``source.md5``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(source.member)
    except KeyError:
        raise VocabFetchError(f"{wheel.name} has no member {source.member!r}") from None
    except zipfile.BadZipFile as e:
        raise VocabFetchError(f"{wheel} is not a valid wheel (zip): {e}") from None
    md5 = hashlib.md5(data).hexdigest()
    if md5 != source.md5:
        raise VocabFetchError(f"{source.member} in {wheel.name} ({source.requirement}) has md5 {md5}, "
                              f"expected {source.md5}: refusing to install it")
    return data


def write_atomic(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` through a temporary file in the same folder and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the vocab is package data anyone may read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_vocab(dest: Path = DEFAULT_VOCAB_PATH, source: VocabSource = DEFAULT_SOURCE) -> bool:
    """Make ``dest`` hold the checked vocab of ``source``; True if it was written, False if it
    already held it (nothing downloaded). Raises :class:`VocabFetchError` on any failure.
    """
    dest = Path(dest)
    if dest.is_file() and file_md5(dest) == source.md5:
        return False
    with tempfile.TemporaryDirectory(prefix="m6-vocab-") as tmp:
        wheel = download_wheel(source.requirement, Path(tmp))
        data = read_member(wheel, source)
    write_atomic(dest, data)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_VOCAB_PATH, help="where to put vocab.txt")
    args = parser.parse_args(argv)
    try:
        written = fetch_vocab(args.dest)
    except VocabFetchError as e:
        print(f"vocab_fetch: {e}", file=sys.stderr)
        return 1
    state = "installed" if written else "already installed"
    print(f"default vocab {state}: {args.dest} (md5 {DEFAULT_SOURCE.md5})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
