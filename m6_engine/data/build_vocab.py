"""Build a BERT-format WordPiece ``vocab.txt`` from a corpus, reproducibly.

Usage: ``python -m m6_engine.data.build_vocab --input FILE [FILE ...] --size N --out vocab.txt
[--cased]``. The same corpus (the same files' contents, in any order) and arguments give a
byte-identical file: nothing depends on hashing, file order or chance, every tie is broken by text.

Algorithm:

1. Words. Every input is read as UTF-8, line by line; each line is split into words by the
   tokenizer's basic tokenisation (:func:`m6_engine.data.tokenizer.basic_tokenize`: cleaning,
   lower-casing and accent stripping unless ``--cased``, one word per CJK ideograph and per
   punctuation character, words of the other characters between whitespace), and words are
   counted. Words over ``MAX_WORD_CHARS`` characters are left out (they encode to [UNK] anyway).
2. The vocab, in this order (ids follow the line order):

   a. the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4);
   b. the alphabet: every character that starts a word (every CJK ideograph and punctuation
      character seen is one, as they are one-character words), then every character seen inside
      a word after its first (as ``##c``); each group by falling count, ties by code point.
      With it every word of the corpus encodes without [UNK];
   c. word pieces by frequency, as byte-pair encoding builds them: each word is a sequence of
      pieces, at first its characters (``w ##o ##r ##d``); the adjacent pair of pieces with the
      highest count (summed over the words holding it, weighted by word count; ties: the
      smallest pair by text) is merged everywhere into one piece (``wo``, ``##rd``: the second
      piece's ``##`` dropped), and the new piece is appended if it is not in the vocab yet.
      Merging stops when the vocab has ``size`` entries or no pair occurs twice.

``size`` below the number of special tokens plus the alphabet is an error naming both numbers.
"""

import argparse
import heapq
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Set, Tuple

from m6_engine.data.tokenizer import CONTINUATION, MAX_WORD_CHARS, SPECIAL_TOKENS, basic_tokenize
from m6_engine.data.vocab_fetch import write_atomic

Pair = Tuple[str, str]

MIN_PAIR_COUNT = 2
"""A pair of pieces seen fewer times than this is not merged (it would add a one-off word)."""


def count_words(lines: Iterable[str], lower_case: bool) -> Counter:
    """Word counts of ``lines`` after basic tokenisation, words over MAX_WORD_CHARS left out."""
    counts: Counter = Counter()
    for line in lines:
        counts.update(basic_tokenize(line, lower_case))
    for word in [w for w in counts if len(w) > MAX_WORD_CHARS]:
        del counts[word]
    return counts


def alphabet(word_counts: Dict[str, int]) -> List[str]:
    """Word-initial characters, then ``##`` + word-internal characters, each by falling count."""
    initial: Counter = Counter()
    inner: Counter = Counter()
    for word, n in word_counts.items():
        initial[word[0]] += n
        for char in word[1:]:
            inner[char] += n

    def by_count(counts: Counter) -> List[str]:
        return sorted(counts, key=lambda c: (-counts[c], c))

    return by_count(initial) + [CONTINUATION + c for c in by_count(inner)]


class _PairMerger:
    """Byte-pair merging over a weighted word list (step 2c of the module docstring).

    Keeps, for every adjacent pair of pieces, its weighted count and the words holding it, and a
    max-heap of (count, pair) whose stale entries (count changed since pushed) are skipped.
    """

    def __init__(self, word_counts: Dict[str, int]):
        words = sorted(w for w in word_counts if len(w) > 1)  # one-character words have no pairs
        self.pieces: List[List[str]] = [[w[0]] + [CONTINUATION + c for c in w[1:]] for w in words]
        self.freqs: List[int] = [word_counts[w] for w in words]
        self.counts: Counter = Counter()
        self.holders: Dict[Pair, Set[int]] = {}
        for index, pieces in enumerate(self.pieces):
            self._add(index, pieces, +1)
        self.heap = [(-n, pair) for pair, n in self.counts.items()]
        heapq.heapify(self.heap)

    def _add(self, index: int, pieces: Sequence[str], sign: int) -> Set[Pair]:
        """Add (sign +1) or remove (-1) the pairs of one word; return the pairs touched."""
        pairs = set(zip(pieces, pieces[1:]))
        for pair in zip(pieces, pieces[1:]):
            self.counts[pair] += sign * self.freqs[index]
        for pair in pairs:
            if sign > 0:
                self.holders.setdefault(pair, set()).add(index)
            else:
                self.holders[pair].discard(index)
        return pairs

    def best_pair(self):
        """The pair to merge next (highest count, then smallest text), or None when none is
        seen MIN_PAIR_COUNT times."""
        while self.heap:
            neg_count, pair = self.heap[0]
            if self.counts.get(pair, 0) == -neg_count:
                return pair if -neg_count >= MIN_PAIR_COUNT else None
            heapq.heappop(self.heap)  # stale: its count changed after it was pushed
        return None

    def merge(self, pair: Pair) -> str:
        """Merge ``pair`` in every word holding it; return the merged piece."""
        left, right = pair
        merged = left + right[len(CONTINUATION):]
        touched: Set[Pair] = set()
        for index in sorted(self.holders.get(pair, ())):
            old = self.pieces[index]
            touched |= self._add(index, old, -1)
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == left and old[i + 1] == right:
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            self.pieces[index] = new
            touched |= self._add(index, new, +1)
        for p in sorted(touched):
            if self.counts[p] > 0:
                heapq.heappush(self.heap, (-self.counts[p], p))
            else:
                del self.counts[p]
                self.holders.pop(p, None)
        return merged


def build_vocab(word_counts: Dict[str, int], size: int) -> List[str]:
    """The vocab of ``size`` entries at most for these word counts (module docstring, step 2)."""
    vocab = list(SPECIAL_TOKENS) + alphabet(word_counts)
    if size < len(vocab):
        raise ValueError(f"--size {size} is below the {len(SPECIAL_TOKENS)} special tokens plus the "
                         f"{len(vocab) - len(SPECIAL_TOKENS)} characters of the corpus "
                         f"({len(vocab)}): raise --size")
    seen = set(vocab)
    merger = _PairMerger(word_counts)
    while len(vocab) < size:
        pair = merger.best_pair()
        if pair is None:
            break
        piece = merger.merge(pair)
        if piece not in seen:
            seen.add(piece)
            vocab.append(piece)
    return vocab


def _read_lines(paths: Sequence[Path]) -> Iterable[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError as e:
            raise ValueError(f"input {str(path)!r} is not UTF-8: {e}") from None


def write_vocab(tokens: Sequence[str], out: Path) -> None:
    """Write one token per line (``\\n`` endings), through a temporary file and a rename."""
    write_atomic(Path(out), "".join(t + "\n" for t in tokens).encode("utf-8"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="UTF-8 text files")
    parser.add_argument("--size", type=int, required=True, help="most entries of the vocab")
    parser.add_argument("--out", type=Path, required=True, help="the vocab.txt to write")
    parser.add_argument("--cased", action="store_true",
                        help="keep case and accents (for a tokenizer with lower_case=False)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.input if not p.is_file()]
    if missing:
        parser.error(f"input file(s) not found: {' '.join(missing)}")
    try:
        counts = count_words(_read_lines(args.input), lower_case=not args.cased)
        tokens = build_vocab(counts, args.size)
    except ValueError as e:
        print(f"build_vocab: {e}", file=sys.stderr)
        return 1
    write_vocab(tokens, args.out)
    print(f"wrote {args.out}: {len(tokens)} entries from {sum(counts.values())} words "
          f"({len(counts)} distinct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
