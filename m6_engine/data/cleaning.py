"""Text cleaning rules of the M6 corpus (paper §2.3) as composable per-document filters.

A document is one JSON object (one line of a JSON-lines file). Its text fields (by default
``title`` and ``content``) are cleaned; every other field (``id``, ``image``, ...) passes through
untouched. ``content`` is required; ``title`` is optional (image-text pairs and plain text have none).

A filter is a callable ``doc -> doc | None`` with a ``name``: it returns the (possibly rewritten)
document, or None to drop it. :class:`FilterChain` runs filters in order and keeps, per filter, a
:class:`FilterStats` (documents seen, dropped, changed, characters removed), so every rule reports
what it removed. The default chain (:func:`build_filters`), in order:

1. ``html``: drop ``<script>``/``<style>`` blocks and comments with their content, replace every
   other tag by a space, decode entities (``&amp;`` ``&nbsp;`` ``&#x4e2d;``).
2. ``charset``: keep only Chinese ideographs (and 〇), ASCII and full-width letters and digits,
   ASCII punctuation and the Chinese punctuation of :data:`CHINESE_PUNCTUATION`; whitespace runs
   become one space. Runs before ``punctuation`` because deleting characters can make repeats.
3. ``punctuation``: a run of one repeated punctuation mark becomes one mark, except the marks
   written in pairs in Chinese (``……`` ``——``), which keep two.
4. ``min_title_length`` / ``min_content_length``: drop a document whose title is shorter than 5
   or whose content is shorter than 15 characters (after cleaning).
5. ``word_list`` (only when a list is given): drop a document containing a listed word.

Deduplication and the perplexity filter need the whole corpus, so they are not per-document
filters: see :mod:`m6_engine.data.dedup` and :class:`PerplexityFilter`, and
:mod:`m6_engine.data.clean` for the pipeline that runs all of them.

Parsing a raw line (:func:`parse_line`) never raises: non-UTF-8 bytes, broken JSON, a value that
is not an object, a missing ``content``, a text field that is not a string or is empty: each
is a :class:`ParseError` whose ``reason`` the pipeline counts.
"""

import html
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]
Doc = Dict[str, object]

TEXT_FIELDS = ("title", "content")
"""The text fields cleaned by default; ``content`` must be present."""

CHINESE_PUNCTUATION = ("，。、；：？！“”‘’（）《》〈〉【】「」『』〔〕…—·～－．／％＋＝＜＞＃＆＊＠"
                       "＿｜﹏–―")
"""Punctuation kept by the ``charset`` rule besides ASCII's."""

PAIRED_MARKS = "…—"
"""Marks written two at a time in Chinese (``……``, ``——``): ``punctuation`` keeps two of them."""


@dataclass(frozen=True)
class CleaningConfig:
    """Which per-document rules run and their thresholds."""

    text_fields: Tuple[str, ...] = TEXT_FIELDS
    """Fields that are cleaned; the first is the optional title, the last the required body."""
    min_title_chars: int = 5
    """A present title shorter than this (after cleaning) drops the document (paper: 5)."""
    min_content_chars: int = 15
    """A content shorter than this (after cleaning) drops the document (paper: 15)."""
    word_list: Optional[str] = None
    """UTF-8 file, one word per line (``#`` starts a comment line); documents containing one are dropped."""


@dataclass
class FilterStats:
    """What one filter did: documents seen, dropped, rewritten, and characters it removed."""

    seen: int = 0
    dropped: int = 0
    changed: int = 0
    chars_removed: int = 0

    def add(self, other: "FilterStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ParseError(ValueError):
    """A line that is not a usable document; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


PARSE_REASONS = ("bad_utf8", "bad_json", "not_object", "missing_content", "bad_field_type", "empty_field")


def parse_line(raw: bytes, text_fields: Sequence[str] = TEXT_FIELDS) -> Doc:
    """One JSON-lines line -> document dict; :class:`ParseError` (with a ``reason``) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError("bad_utf8", str(e)) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParseError("bad_json", str(e)) from None
    if not isinstance(doc, dict):
        raise ParseError("not_object", f"a JSON {type(doc).__name__}, not an object")
    body = text_fields[-1]
    if body not in doc:
        raise ParseError("missing_content", f"no {body!r} field")
    for name in text_fields:
        if name in doc and not isinstance(doc[name], str):
            raise ParseError("bad_field_type", f"{name!r} is a {type(doc[name]).__name__}, not a string")
        if name in doc and not doc[name].strip():
            raise ParseError("empty_field", f"{name!r} is empty")
    if "image" in doc and not isinstance(doc["image"], str):
        raise ParseError("bad_field_type", "'image' is not a string path")
    return doc


def _text_chars(doc: Doc, text_fields: Sequence[str]) -> int:
    return sum(len(doc[f]) for f in text_fields if f in doc)


class FilterChain:
    """Runs filters in order over documents, counting per filter (see the module docstring)."""

    def __init__(self, filters: Sequence[Callable[[Doc], Optional[Doc]]], text_fields: Sequence[str]):
        self.filters = list(filters)
        self.text_fields = tuple(text_fields)
        names = [f.name for f in self.filters]
        if len(set(names)) != len(names):
            raise ValueError(f"filter names must be unique, got {names}")

    def new_stats(self) -> Dict[str, FilterStats]:
        return {f.name: FilterStats() for f in self.filters}

    def __call__(self, doc: Doc, stats: Dict[str, FilterStats]) -> Optional[Doc]:
        for flt in self.filters:
            s = stats[flt.name]
            s.seen += 1
            before = _text_chars(doc, self.text_fields)
            out = flt(doc)
            if out is None:
                s.dropped += 1
                s.chars_removed += before
                return None
            after = _text_chars(out, self.text_fields)
            if out is not doc:
                s.changed += 1
                s.chars_removed += max(before - after, 0)
            doc = out
        return doc


class TextRule:
    """A rewrite of every text field by ``fn``; returns the same dict object when nothing changed."""

    def __init__(self, name: str, fn: Callable[[str], str], text_fields: Sequence[str]):
        self.name, self.fn, self.text_fields = name, fn, tuple(text_fields)

    def __call__(self, doc: Doc) -> Doc:
        new = {f: self.fn(doc[f]) for f in self.text_fields if f in doc}
        if all(new[f] == doc[f] for f in new):
            return doc
        return {**doc, **new}


_HTML_BLOCKS = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<![^<>]*>")


def strip_html(text: str) -> str:
    """Remove markup (script/style blocks and comments with their content; tags become a space)
    and decode character entities."""
    if "<" not in text and "&" not in text:
        return text
    return html.unescape(_HTML_TAG.sub(" ", _HTML_BLOCKS.sub(" ", text)))


_ALLOWED = ("\u4e00-\u9fff\u3400-\u4dbf\u3007"  # CJK unified ideographs, extension A, 〇
            "!-~"  # printable ASCII: letters, digits, punctuation
            "\uff10-\uff19\uff21-\uff3a\uff41-\uff5a"  # full-width digits and letters
            + re.escape(CHINESE_PUNCTUATION))
_DISALLOWED = re.compile(rf"[^{_ALLOWED}\s]+")
_SPACES = re.compile(r"\s+")


def keep_charset(text: str) -> str:
    """Delete every character outside Chinese, English, digits and their punctuation; whitespace
    runs become one space, the ends are stripped."""
    return _SPACES.sub(" ", _DISALLOWED.sub("", text)).strip()


_PUNCT_CLASS = "!-/:-@\\[-`{-~" + re.escape(CHINESE_PUNCTUATION)
_REPEATED_PUNCT = re.compile(rf"([{_PUNCT_CLASS}])\1+")


def collapse_punctuation(text: str) -> str:
    """Collapse a run of one repeated punctuation mark: ``！！！`` -> ``！``, ``………`` -> ``……``."""
    def one(m: re.Match) -> str:
        mark = m.group(1)
        return mark * 2 if mark in PAIRED_MARKS else mark

    return _REPEATED_PUNCT.sub(one, text)


class MinLength:
    """Drop a document whose ``field`` is present and shorter than ``min_chars`` characters."""

    def __init__(self, name: str, field_name: str, min_chars: int):
        if min_chars < 0:
            raise ValueError(f"{name}: min_chars must be >= 0, got {min_chars}")
        self.name, self.field_name, self.min_chars = name, field_name, min_chars

    def __call__(self, doc: Doc) -> Optional[Doc]:
        text = doc.get(self.field_name)
        return None if text is not None and len(text) < self.min_chars else doc


def read_word_list(path: PathLike) -> List[str]:
    """Words of a UTF-8 list, one per line, lower-cased; blank lines and ``#`` lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"word list {str(p)!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"word list {str(p)!r} is not UTF-8: {e}") from None
    words = [w.strip().lower() for w in lines]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"word list {str(p)!r} holds no words")
    return words


class WordList:
    """Drop a document containing a listed word (case-insensitive) in any text field.

    ASCII words match whole words only: ``ass`` does not match ``class`` but matches ``是ass吗``
    (only ASCII letters and digits extend a word). Other words (Chinese) match as substrings, since
    Chinese has no spaces between words; they are indexed by first character, so a document costs
    one dict lookup per character plus a check of the candidate lengths there.
    """

    def __init__(self, words: Iterable[str], text_fields: Sequence[str], name: str = "word_list"):
        self.name, self.text_fields = name, tuple(text_fields)
        words = sorted({w.lower() for w in words if w})
        ascii_words = [w for w in words if w.isascii()]
        # ASCII boundaries, not \w: a Chinese character next to an English word is a boundary.
        alternatives = "|".join(map(re.escape, sorted(ascii_words, key=len, reverse=True)))
        self._ascii = re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])") if ascii_words else None
        self._by_first: Dict[str, Dict[int, set]] = {}
        for w in words:
            if not w.isascii():
                self._by_first.setdefault(w[0], {}).setdefault(len(w), set()).add(w)

    def _contains(self, text: str) -> bool:
        text = text.lower()
        if self._ascii is not None and self._ascii.search(text):
            return True
        by_first = self._by_first
        for i, ch in enumerate(text):
            lengths = by_first.get(ch)
            if lengths and any(text[i:i + n] in ws for n, ws in lengths.items()):
                return True
        return False

    def __call__(self, doc: Doc) -> Optional[Doc]:
        return None if any(self._contains(doc[f]) for f in self.text_fields if f in doc) else doc


def build_filters(config: CleaningConfig) -> FilterChain:
    """The default chain of the module docstring, configured by ``config``."""
    tf = config.text_fields
    if len(tf) < 1:
        raise ValueError("CleaningConfig.text_fields must name at least the content field")
    filters = [TextRule("html", strip_html, tf), TextRule("charset", keep_charset, tf),
               TextRule("punctuation", collapse_punctuation, tf)]
    if len(tf) > 1:
        filters.append(MinLength("min_title_length", tf[0], config.min_title_chars))
    filters.append(MinLength("min_content_length", tf[-1], config.min_content_chars))
    if config.word_list is not None:
        filters.append(WordList(read_word_list(config.word_list), tf))
    return FilterChain(filters, tf)


def document_text(doc: Doc, text_fields: Sequence[str] = TEXT_FIELDS) -> str:
    """The text fields of a document joined by newlines (what dedup and perplexity look at)."""
    return "\n".join(doc[f] for f in text_fields if f in doc)


PerplexityScorer = Callable[[str], float]
"""Scores one text: its perplexity under a language model (lower = more fluent). The M6 checkpoint
scorer implements this; the cleaning pipeline calls it once per document that survives dedup."""


@dataclass
class PerplexityFilter:
    """Drop the ``drop_fraction`` of documents with the highest perplexity.

    A fraction of the corpus needs every score first, so the pipeline scores all documents, then
    asks :meth:`dropped` which to remove: ``floor(drop_fraction * n)`` of them, highest perplexity
    first, ties going to the later document; a NaN or infinite score counts as the worst.
    """

    scorer: PerplexityScorer
    drop_fraction: float
    name: str = "perplexity"
    stats: FilterStats = field(default_factory=FilterStats)

    def __post_init__(self):
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"perplexity drop_fraction must be in [0, 1), got {self.drop_fraction}")

    def score(self, text: str) -> float:
        value = float(self.scorer(text))
        return value if math.isfinite(value) else math.inf

    def dropped(self, scores: Sequence[float]) -> np.ndarray:
        """Boolean mask over ``scores``: True for the documents to remove."""
        s = np.asarray(scores, dtype=np.float64)
        n = len(s)
        k = int(math.floor(self.drop_fraction * n))
        s = np.where(np.isfinite(s), s, np.inf)
        order = np.lexsort((-np.arange(n), -s))  # highest score first, then the later document
        mask = np.zeros(n, dtype=bool)
        mask[order[:k]] = True
        self.stats.seen += n
        self.stats.dropped += k
        return mask
