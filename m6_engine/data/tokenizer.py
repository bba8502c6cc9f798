"""BERT WordPiece tokenizer, as used by bert-base-chinese (M6 paper, §3: vocab of 21128 entries).

Text -> ids in two stages, the same as BERT's (and Hugging Face's ``BertTokenizer``, which the
tests hold it equal to, id for id):

1. Basic tokenisation (:func:`basic_tokenize`), on the whole text:
   a. clean: drop NUL, U+FFFD and the control, format, private-use and surrogate characters
      (Cc Cf Co Cs) except ``\\t \\n \\r``, which count as whitespace;
   b. if ``lower_case``: Unicode NFD, drop non-spacing marks (Mn: strip accents), then lower-case
      character by character (so a final capital sigma becomes ``σ``, never ``ς``);
   c. split into words: each CJK ideograph is a word of its own, each punctuation character
      (Unicode P* or ASCII ``!-/ :-@ [-` {-~``) is a word of its own, every other maximal run of
      non-whitespace characters is a word; whitespace (Unicode White_Space) only separates.
   The character classes are Hugging Face's, which are Unicode 8.0's (see ``_PUNCT_NEWER``).
2. WordPiece, per word: greedy longest-match-first over the vocab, the pieces after the first
   prefixed with ``##``; a word with a character sequence no piece covers, or longer than
   :data:`MAX_WORD_CHARS` characters, becomes the single token ``[UNK]``.

Literal special-token strings in the text (``"[MASK]"``) are plain text here, tokenised like any
other characters (Hugging Face's ``split_special_tokens=True``): corpus text cannot forge a control
token. Code that needs special tokens inserts their ids (``cls_id``, ``sep_id``, ...).

Speed (the hot path is :meth:`BertWordPieceTokenizer.encode`): normalisation is a few C-level
passes (``str.isprintable`` spares the cleaning pass on clean text). A text of 64 characters or
more then goes through one numpy lookup in a per-tokenizer table of every code point, which gives
each one-character word's id and marks whitespace and the characters of longer words; Chinese
text is nearly all one-character words, and the few runs of other characters go through WordPiece
(cached per word) and are merged in at their positions. Shorter texts take one ``regex`` split.
"""

import functools
import itertools
import unicodedata
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
import regex

from m6_engine.data import vocab_fetch

PathLike = Union[str, Path]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens every vocab must hold (M6 uses [CLS] / [SEP] to start / end a text)."""

MAX_WORD_CHARS = 100
"""A word longer than this (in characters) is [UNK], as in BERT."""

CONTINUATION = "##"
"""Prefix of a WordPiece piece that continues a word."""


# ---- character classes ------------------------------------------------------------------------

def _char_class(spec: str) -> str:
    """Regex character-class body for code points written ``"05C8-05C9 07FD ..."`` (hex)."""
    return "".join("-".join(f"\\U{int(h, 16):08x}" for h in item.split("-")) for item in spec.split())


# The CJK ideograph blocks as BERT and Hugging Face's normaliser have them: URO, Ext A, B, C, D,
# E+F (from 2B920, as Hugging Face has it), compatibility ideographs and their supplement.
# Not Hiragana, Katakana, Hangul: those form words like Latin letters do.
_CJK = _char_class("4E00-9FFF 3400-4DBF 20000-2A6DF 2A700-2B73F 2B740-2B81F 2B920-2CEAF "
                   "F900-FAFF 2F800-2FA1F")

# Hugging Face's tokenizers (the reference, tests/test_tokenizer.py) classifies characters with
# Unicode 8.0 tables, while the `regex` module knows Unicode 17. The characters that the newer
# tables call punctuation, format or non-spacing mark and Hugging Face does not (added since
# 8.0, or recategorised) are listed and taken out. Back in: U+166D and U+111C9 (punctuation in
# 8.0), U+1734 and U+1171E (non-spacing marks in 8.0). U+11938 is kept whole by NFD (its
# decomposition dates from Unicode 13). Unassigned code points (Cn) are word characters there.
# The test over every code point finds any drift (after a `regex` upgrade, say).
_PUNCT_NEWER = _char_class("""
061D 09FD 0A76 0C77 0C84 1B4E-1B4F 1B7D-1B7F 2E43-2E4F 2E52-2E5D 2E60-2E63 10D6E 10EAD 10ED0
10F55-10F59 10F86-10F89 113D4-113D5 113D7-113D8 1144B-1144F 1145A-1145B 1145D 11660-1166C
116B9 1183B 11944-11946 119E2 11A3F-11A46 11A9A-11A9C 11A9E-11AA2 11B00-11B09 11BE1
11C41-11C45 11C70-11C71 11EF7-11EF8 11F43-11F4F 11FFF 12FF1-12FF2 16D6D-16D6F 16E97-16E9A
16FE2 1E5FF 1E95E-1E95F""")
_FORMAT_NEWER = _char_class("0890-0891 08E2 110CD 13430-1343F")
_MARK_NEWER = _char_class("""
05C8-05C9 07FD 0897-089F 08CA-08E1 09FE 0AFA-0AFF 0B53-0B55 0C04 0C3C 0D00 0D3B-0D3C 0D81
0EBA 0ECE 180F 1885-1886 1ABF-1AF0 1DF6-1DFB A82C A8C5 A8FF A9BD 10D24-10D27 10D69-10D6D
10EAB-10EAC 10ECB-10ECF 10EF0-10EFF 10F46-10F50 10F82-10F85 11070 11073-11074 110C2 111C9 111CF
1123E 11241 1133B 113BB-113C0 113CE 113D0 113D2 113E1-113E2 11438-1143F 11442-11444 11446
1145E 1182F-11837 11839-1183A 1193B-1193C 1193E 11943 119D4-119D7 119DA-119DB 119E0
11A01-11A0A 11A33-11A38 11A3B-11A3E 11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A99
11B60 11B62-11B64 11B66 11C30-11C36 11C38-11C3D 11C3F 11C92-11CA7 11CAA-11CB0 11CB2-11CB3
11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 11D97 11DF0
11EF3-11EF4 11F00-11F01 11F36-11F3A 11F40 11F42 11F5A 13440 13447-13455 1611E-16129
1612D-1612F 16F4F 16FE4 1CF00-1CF2D 1CF30-1CF46 1D127-1D128 1D25B-1D25C 1E000-1E006
1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF
1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5 1E944-1E94A""")
_DECOMPOSED_NEWER = "\U00011938"
# Capital letters whose lower case Python's str.lower() (Unicode 14 on 3.11) may not know but
# Hugging Face's (Rust's) does: (first capital, last capital, lower minus capital).
_LOWER_NEWER = ((0x1C89, 0x1C89, 1), (0xA7CB, 0xA7CB, 0x0264 - 0xA7CB), (0xA7CC, 0xA7CC, 1),
                (0xA7CE, 0xA7CE, 1), (0xA7D2, 0xA7D2, 1), (0xA7D4, 0xA7D4, 1), (0xA7DA, 0xA7DA, 1),
                (0xA7DC, 0xA7DC, 0x019B - 0xA7DC), (0x10D50, 0x10D65, 0x20), (0x16EA0, 0x16EB8, 0x1B))
_LOWER_NEWER_MAP = {chr(c): chr(c + d) for a, b, d in _LOWER_NEWER for c in range(a, b + 1)}

_PUNCT = rf"[\p{{P}}!-/:-@\[-`{{-~\u166d\U000111c9]--[{_PUNCT_NEWER}]"
_SPACE = r"\p{White_Space}"
_MARK = rf"[\p{{Mn}}\u1734\U0001171e--[{_MARK_NEWER}]]"
_UPPER_NEWER = _char_class(" ".join(f"{a:X}-{b:X}" for a, b, _ in _LOWER_NEWER))

# Step 1a: what cleaning drops (\t \n \r are whitespace, kept).
_DROP = regex.compile(rf"[\x00\ufffd\p{{Cc}}\p{{Cf}}\p{{Co}}\p{{Cs}}--[\t\n\r{_FORMAT_NEWER}]]+", regex.V1)
# Step 1b in one pass: delete runs of marks (group 1), lower-case the newer capitals (group 2).
_MARK_OR_UPPER_NEWER = regex.compile(rf"({_MARK}+)|([{_UPPER_NEWER}])", regex.V1)
# Step 1c: splitting with this capture group gives [stretch, run, stretch, ..., run, stretch]: a
# run is one word of several-character kind (letters, digits, ...), a stretch holds one-character
# words (CJK, punctuation) and whitespace only.
_RUNS = regex.compile(rf"([^{_SPACE}{_CJK}[{_PUNCT}]]+)", regex.V1)
_ONE_CHAR_WORDS = regex.compile(rf"(?:[{_CJK}]|[{_PUNCT}])+", regex.V1)
_SPACE_CHARS = frozenset(regex.findall(_SPACE, "".join(map(chr, range(0x3001)))))  # all < U+3001


# ---- basic tokenisation ----------------------------------------------------------------------

def _strip_mark_or_lower(match) -> str:
    return "" if match.group(1) else _LOWER_NEWER_MAP[match.group(2)]


def _nfd(text: str) -> str:
    if _DECOMPOSED_NEWER in text:  # a starter: splitting there does not change the NFD elsewhere
        return _DECOMPOSED_NEWER.join(_nfd(part) for part in text.split(_DECOMPOSED_NEWER))
    return unicodedata.normalize("NFD", text)


def normalize(text: str, lower_case: bool) -> str:
    """Steps 1a-1b of the module docstring: drop control characters; NFD, strip marks, lower-case."""
    if not text.isprintable():  # printable: no Cc Cf Co Cs (nor Zs but " ", Zl, Zp) to drop
        text = _DROP.sub("", text)
    if not lower_case:
        return text
    if text.isascii():  # no decompositions, no marks, no contextual lower case
        return text.lower()
    text = _MARK_OR_UPPER_NEWER.sub(_strip_mark_or_lower, _nfd(text))
    # str.lower() turns a word-final capital sigma into "ς" (a context rule); BERT and Hugging Face
    # lower-case each character alone ("σ"). Mapping Σ first removes the only contextual rule.
    return text.replace("\u03a3", "\u03c3").lower()


def basic_tokenize(text: str, lower_case: bool) -> List[str]:
    """Words of ``text`` before WordPiece (step 1 of the module docstring)."""
    words: List[str] = []
    for i, part in enumerate(_RUNS.split(normalize(text, lower_case))):
        if i % 2:
            words.append(part)
        else:
            words.extend(c for c in part if c not in _SPACE_CHARS)
    return words


# ---- vocab ----------------------------------------------------------------------------------

def read_vocab(vocab_file: PathLike) -> List[str]:
    """The tokens of a BERT ``vocab.txt`` (UTF-8, one token per line, id = line number from 0).

    Lines end at ``\\n`` only (bert-base-chinese holds U+2028 as a token); a trailing ``\\r`` is
    dropped. Raises ``ValueError`` naming the file for an empty file, an empty line, a token listed
    twice, or a missing special token; ``FileNotFoundError`` for a missing file.
    """
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"vocab file {str(path)!r} is not UTF-8: {e}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    tokens = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not tokens:
        raise ValueError(f"vocab file {str(path)!r} is empty")
    first_line: Dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token == "":
            raise ValueError(f"vocab file {str(path)!r}: line {i + 1} is empty")
        if token in first_line:
            raise ValueError(f"vocab file {str(path)!r}: token {token!r} on line {i + 1} "
                             f"duplicates line {first_line[token] + 1}")
        first_line[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in first_line]
    if missing:
        raise ValueError(f"vocab file {str(path)!r} lacks the special token(s) {' '.join(missing)} "
                         f"(a BERT vocab holds all of {' '.join(SPECIAL_TOKENS)})")
    return tokens


def default_vocab_path() -> Path:
    """The installed bert-base-chinese vocab (21128 entries), checked against its md5.

    ``make install`` puts it there (``python -m m6_engine.data.vocab_fetch``); raises
    ``FileNotFoundError`` saying so when it is absent, ``ValueError`` when it is not the right file.
    """
    path = vocab_fetch.DEFAULT_VOCAB_PATH
    if not path.is_file():
        raise FileNotFoundError(f"the default vocab {str(path)!r} is not installed: run `make install` "
                                f"(or `python -m m6_engine.data.vocab_fetch`)")
    md5 = vocab_fetch.file_md5(path)
    if md5 != vocab_fetch.DEFAULT_SOURCE.md5:
        raise ValueError(f"the default vocab {str(path)!r} has md5 {md5}, expected "
                         f"{vocab_fetch.DEFAULT_SOURCE.md5}: delete it and run `make install`")
    return path


# ---- the tokenizer ----------------------------------------------------------------------------

# Cap on cached words per tokenizer: all CJK characters and the common words fit; past it new
# words are computed each time rather than growing memory without bound on a huge corpus.
_CACHE_LIMIT = 1 << 18

# Entries of a tokenizer's character table besides ids (>= 0).
_IN_RUN, _WHITESPACE = -2, -1
# Below this many characters the table lookup's fixed numpy cost exceeds a Python loop's.
_TABLE_MIN_CHARS = 64


@functools.lru_cache(maxsize=1)
def _one_char_word_code_points() -> np.ndarray:
    """Sorted code points that are words on their own (CJK ideographs, punctuation): read-only."""
    every_char = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    spans = [m.span() for m in _ONE_CHAR_WORDS.finditer(every_char)]
    points = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans])
    points.flags.writeable = False
    return points


def _char_table(token_to_id: Dict[str, int], unk_id: int) -> np.ndarray:
    """Per code point (int32, 0x110000 entries): the id of the character as a one-character word
    (its vocab id, or [UNK]'s), _WHITESPACE, or _IN_RUN for characters of longer words."""
    table = np.full(0x110000, _IN_RUN, dtype=np.int32)
    table[_one_char_word_code_points()] = unk_id
    table[[ord(c) for c in _SPACE_CHARS]] = _WHITESPACE
    singles = [(ord(t), i) for t, i in token_to_id.items() if len(t) == 1]
    if singles:
        points, ids = np.array(singles, dtype=np.int64).T
        is_word = table[points] == unk_id  # vocab characters that are one-character words
        table[points[is_word]] = ids[is_word]
    return table


class BertWordPieceTokenizer:
    """BERT WordPiece tokenizer over any BERT ``vocab.txt`` (see the module docstring).

    ``tokenize(text) -> list[str]``, ``encode(text) -> list[int]`` (no [CLS]/[SEP] added),
    ``decode(ids) -> str``; ``vocab_size``; the special ids ``pad_id unk_id cls_id sep_id mask_id``.
    ``lower_case`` also strips accents, as bert-base-chinese (uncased) does.
    """

    def __init__(self, vocab_file: PathLike, lower_case: bool = True):
        self.vocab_file = str(vocab_file)
        self.lower_case = lower_case
        self._id_to_token: List[str] = read_vocab(vocab_file)
        self._token_to_id: Dict[str, int] = {t: i for i, t in enumerate(self._id_to_token)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self._token_to_id[t] for t in SPECIAL_TOKENS)
        self._special_ids = frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))
        self._max_piece_chars = max(len(t) for t in self._id_to_token)
        self._cache: Dict[str, Tuple[int, ...]] = {}
        self._char_table = _char_table(self._token_to_id, self.unk_id)

    @property
    def vocab_size(self) -> int:
        """Number of entries of the vocab (ids are 0 .. vocab_size - 1)."""
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        """Id of a vocab entry; ``KeyError`` naming the token when it is not one."""
        try:
            return self._token_to_id[token]
        except KeyError:
            raise KeyError(f"{token!r} is not in the vocab {self.vocab_file!r}") from None

    def id_to_token(self, token_id: int) -> str:
        """Vocab entry of an id; ``ValueError`` naming the id when out of range."""
        if not 0 <= token_id < len(self._id_to_token):
            raise ValueError(f"token id {token_id} is outside the vocab [0, {len(self._id_to_token)})")
        return self._id_to_token[token_id]

    def encode(self, text: str) -> List[int]:
        """Ids of the WordPiece tokens of ``text`` (no [CLS]/[SEP] added)."""
        norm = normalize(text, self.lower_case)
        if len(norm) < _TABLE_MIN_CHARS:
            return self._encode_short(norm)
        char_ids = self._char_table[np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32)]  # (n,)
        in_run = char_ids == _IN_RUN
        if not in_run.any():  # only one-character words (Chinese, mostly): no WordPiece to do
            return char_ids[char_ids >= 0].tolist()
        # Runs are the maximal stretches of _IN_RUN; each one's pieces go where it starts.
        edges = np.flatnonzero(np.diff(in_run.view(np.int8), prepend=0, append=0))
        starts, ends = edges[0::2], edges[1::2]
        run_ids = [self._word_ids(norm[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
        lengths = [len(p) for p in run_ids]
        singles = np.flatnonzero(char_ids >= 0)
        positions = np.concatenate([singles, np.repeat(starts, lengths)])
        values = np.concatenate([char_ids[singles], np.fromiter(itertools.chain.from_iterable(run_ids),
                                                                dtype=np.int32, count=sum(lengths))])
        return values[np.argsort(positions, kind="stable")].tolist()

    def _encode_short(self, norm: str) -> List[int]:
        """:meth:`encode` of a normalised text, by the regex split (cheaper on short texts)."""
        vocab_get, unk_id = self._token_to_id.get, self.unk_id
        ids: List[int] = []
        for i, part in enumerate(_RUNS.split(norm)):
            if i % 2:
                ids.extend(self._word_ids(part))
            else:  # one-character words and whitespace
                ids.extend([vocab_get(c, unk_id) for c in part if c not in _SPACE_CHARS])
        return ids

    def _word_ids(self, word: str) -> Tuple[int, ...]:
        """WordPiece ids of one word, through the cache."""
        pieces = self._cache.get(word)
        if pieces is None:
            pieces = self._wordpiece(word)
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[word] = pieces
        return pieces

    def tokenize(self, text: str) -> List[str]:
        """The WordPiece tokens of ``text``: ``[UNK]`` for an uncovered word, ``##`` continuations."""
        table = self._id_to_token
        return [table[i] for i in self.encode(text)]

    def _wordpiece(self, word: str) -> Tuple[int, ...]:
        """Greedy longest-match-first split of one word into vocab ids; (unk_id,) if impossible."""
        vocab, n = self._token_to_id, len(word)
        if n > MAX_WORD_CHARS:
            return (self.unk_id,)
        ids, start = [], 0
        while start < n:
            prefix = CONTINUATION if start > 0 else ""
            for end in range(min(n, start + self._max_piece_chars), start, -1):
                piece_id = vocab.get(prefix + word[start:end])
                if piece_id is not None:
                    ids.append(piece_id)
                    start = end
                    break
            else:
                return (self.unk_id,)
        return tuple(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: ``##`` pieces glued to the piece before them, words joined by spaces
        except next to CJK characters and non-ASCII punctuation, before ASCII closing punctuation
        and after ASCII opening brackets. Lossy (case, accents and spacing were normalised away).
        """
        tokens = [self.id_to_token(int(i)) for i in ids
                  if not (skip_special_tokens and int(i) in self._special_ids)]
        return join_tokens(tokens)


_NO_SPACE_BEFORE = frozenset(".,!?;:%)]}")
_NO_SPACE_AFTER = frozenset("([{")
_TIGHT = regex.compile(rf"[{_CJK}]|[[{_PUNCT}]--[\x00-\x7f]]", regex.V1)  # no space on either side


def join_tokens(tokens: Sequence[str]) -> str:
    """Join WordPiece tokens into text (the rule of :meth:`BertWordPieceTokenizer.decode`)."""
    out: List[str] = []
    prev = None
    for token in tokens:
        if prev is not None and token.startswith(CONTINUATION) and len(token) > len(CONTINUATION):
            out.append(token[len(CONTINUATION):])
        else:
            if prev is not None and _space_between(prev, token):
                out.append(" ")
            out.append(token)
        prev = token
    return "".join(out)


def _space_between(left: str, right: str) -> bool:
    if _TIGHT.fullmatch(left) or _TIGHT.fullmatch(right):
        return False
    return right not in _NO_SPACE_BEFORE and left not in _NO_SPACE_AFTER
