"""Reading evaluation files with errors that name the file and line, writing predictions atomically."""

import json
from pathlib import Path
from typing import Iterable

from m6_engine.data.streaming import atomic_file


class DataFormatError(ValueError):
    """An input file is not in the expected format; the message names the file and the line."""


def read_json_lines(path, fields: dict) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file.

    ``fields`` maps each required key to its type (a type or a tuple of types); a line that is
    not a JSON object, lacks a key or holds a value of another type is a :class:`DataFormatError`
    naming ``path:line``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text ({error})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key, kind in fields.items():
            if key not in obj:
                raise DataFormatError(f"{where}: missing field {key!r}")
            if not isinstance(obj[key], kind) or (isinstance(obj[key], bool) and kind is int):
                raise DataFormatError(f"{where}: field {key!r} must be {_type_name(kind)}, got "
                                      f"{type(obj[key]).__name__}")
        rows.append((number, obj))
    if not rows:
        raise DataFormatError(f"{path}: no examples (the file is empty)")
    return rows


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def write_predictions(path, records: Iterable[dict]) -> None:
    """One JSON object per line, UTF-8, published whole (temporary file + rename)."""
    with atomic_file(Path(path), "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
