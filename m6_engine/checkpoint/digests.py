"""The size and crc32 of every file a save writes, taken from its bytes as they are written.

A checkpoint's manifest lists each file's size and crc32 (``folders``). Reading a checkpoint back
to compute them doubles a save's I/O (at 10B, ~142 GB read after ~142 GB written), so the digests
are taken on the way out instead: :class:`DigestingWriter` is DCP's ``FileSystemWriter`` with its
file system (``self.fs``) replaced by a :class:`DigestingFileSystem`, whose streams run
``zlib.crc32`` over every buffer they pass to the file.

Why the file system and not the writer's methods: in every supported torch (2.11 and 2.14 read
alike here) the writer opens every file it writes through ``self.fs.create_stream(path, "wb")``
(a shard per write bucket, and on the coordinator ``.metadata.tmp``, then ``self.fs.rename`` to
``.metadata``) and writes it front to back: ``_write_item`` appends ``torch.save`` output or raw
bytes and only ever asks ``tell()``. The stream refuses ``seek`` and any mode but "wb", so a torch
that wrote otherwise would fail the save loudly instead of recording a wrong digest, and the save
checks that every file in the folder was digested, with its size (``save``).
"""

import io
import os
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem


class DigestingStream(io.IOBase):
    """A write-only, front-to-back stream over ``raw`` that keeps the size and crc32 of what went
    through it; ``on_close(size, crc32)`` is called once the file is closed without error."""

    def __init__(self, raw, on_close):
        super().__init__()
        self._raw, self._on_close = raw, on_close
        self.size, self.crc32 = 0, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False   # a seek would make the running crc32 differ from the file's

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self._raw.write(view)
        written = len(view) if written is None else written
        self.crc32 = zlib.crc32(view[:written], self.crc32)
        self.size += written
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()   # DCP fsyncs shards and metadata through it

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._raw.close()
        finally:
            super().close()
        self._on_close(self.size, self.crc32)


class DigestingFileSystem(FileSystem):
    """DCP's local file system whose write streams record (size, crc32) per file, by path."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()   # DCP may write several files from several threads
        self._written: dict[Path, tuple[int, int]] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            raise ValueError(f"checkpoint writer opened {path} with mode {mode!r}: only whole files "
                             "written front to back ('wb') can be digested while they are written")
        path = Path(path)
        with super().create_stream(path, mode) as raw:
            stream = DigestingStream(raw, lambda size, crc: self._record(path, size, crc))
            yield stream
            stream.close()

    def _record(self, path: Path, size: int, crc: int) -> None:
        with self._lock:
            self._written[path] = (size, crc)

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path) in self._written:
                self._written[Path(new_path)] = self._written.pop(Path(path))

    def rm_file(self, path) -> None:
        super().rm_file(path)
        with self._lock:
            self._written.pop(Path(path), None)

    def digests(self, folder: Path) -> dict[str, tuple[int, int]]:
        """{file name: (size, crc32)} of the files this file system wrote into ``folder``."""
        folder = Path(folder)
        with self._lock:
            strays = sorted(str(p) for p in self._written if p.parent != folder)
            if strays:
                raise ValueError(f"checkpoint writer wrote outside its folder {folder}: {strays}")
            return {p.name: digest for p, digest in self._written.items()}


class DigestingWriter(FileSystemWriter):
    """``FileSystemWriter(path, **options)`` whose files' sizes and crc32 are :meth:`digests`."""

    def __init__(self, path: str | os.PathLike, **options):
        super().__init__(path, **options)
        self.fs = DigestingFileSystem()

    def digests(self) -> dict[str, tuple[int, int]]:
        """{file name: (size, crc32)} of every file this rank wrote (the shards; on the
        coordinator also ``.metadata``)."""
        return self.fs.digests(Path(self.path))


__all__ = ["DigestingFileSystem", "DigestingStream", "DigestingWriter"]
