"""Zero-shot idiom cloze in the ChID protocol (paper §4.1.2, table 7), as text denoising.

Input: JSON-lines with ``content`` (a passage with one blank ``#idiom#``, also accepted as
``#idiom<digits>#``), ``candidates`` (the idioms, 10 in ChID) and ``answer`` (index of the right one).

As in pretraining's text denoising, the blank becomes one ``[MASK]`` in the masked text (after the
prompt "成语填空:") and the complete text is the whole passage with a candidate in the blank:

    masked text:    成语填空: <left> [MASK] <right>
    complete text:  [CLS] <left> <idiom> <right> [SEP]        one per candidate

The candidate whose complete text has the lowest perplexity wins. Passages are cut to a window of
at most 256 tokens around the blank (fewer when the model's text parts are shorter: each part
must fit half of the text positions), taking from both sides evenly and giving what one side
lacks to the other.
"""

import re
from dataclasses import dataclass
from typing import Sequence

from m6_engine.evaluate.records import DataFormatError, read_json_lines

BLANK = re.compile(r"#idiom\d*#")
PROMPT = "成语填空:"
MAX_PASSAGE_TOKENS = 256


@dataclass(frozen=True)
class ChIDExample:
    left: str
    """Passage text before the blank."""
    right: str
    """Passage text after the blank."""
    candidates: tuple
    answer: int
    line: int


def read_chid(path) -> list[ChIDExample]:
    """Examples of a ChID JSON-lines file; errors name the line."""
    examples = []
    for line, obj in read_json_lines(path, {"content": str, "candidates": list, "answer": int}):
        where = f"{path}:{line}"
        blanks = BLANK.findall(obj["content"])
        if len(blanks) != 1:
            raise DataFormatError(f"{where}: content must hold exactly one #idiom# blank, "
                                  f"found {len(blanks)}")
        candidates = obj["candidates"]
        if len(candidates) < 2 or not all(isinstance(c, str) and c for c in candidates):
            raise DataFormatError(f"{where}: candidates must be a list of at least 2 non-empty strings")
        if not 0 <= obj["answer"] < len(candidates):
            raise DataFormatError(f"{where}: answer {obj['answer']} is not an index of the "
                                  f"{len(candidates)} candidates")
        left, right = BLANK.split(obj["content"])
        examples.append(ChIDExample(left, right, tuple(candidates), obj["answer"], line))
    return examples


def window(left: list, right: list, size: int) -> tuple[list, list]:
    """At most ``size`` tokens around the blank: the end of ``left`` and the start of ``right``,
    half each, what one side lacks given to the other."""
    take_left = min(len(left), max(size // 2, size - len(right)))
    take_right = min(len(right), size - take_left)
    return left[len(left) - take_left:], right[:take_right]


def chid_inputs(tokenizer, example: ChIDExample, mask_id: int, max_text_positions: int):
    """(masked ids, [complete-text ids without specials per candidate])."""
    prompt = tokenizer.encode(PROMPT)
    idioms = [tokenizer.encode(c) for c in example.candidates]
    part = max_text_positions // 2
    size = min(MAX_PASSAGE_TOKENS, part - len(prompt) - 1, part - 2 - max(len(i) for i in idioms))
    if size < 0:
        raise ValueError(f"line {example.line}: the idioms do not fit a text part of {part} tokens")
    left, right = window(tokenizer.encode(example.left), tokenizer.encode(example.right), size)
    return prompt + left + [mask_id] + right, [left + idiom + right for idiom in idioms]


def evaluate_chid(backend, tokenizer, examples: Sequence[ChIDExample], mask_id: int,
                  max_text_positions: int) -> tuple[dict, list[dict]]:
    """({"accuracy", "examples"}, per-example records)."""
    correct, records = 0, []
    for example in examples:
        masked, texts = chid_inputs(tokenizer, example, mask_id, max_text_positions)
        ppl = backend.perplexities(masked, texts)
        prediction = min(range(len(ppl)), key=ppl.__getitem__)       # ties: the earlier candidate
        correct += prediction == example.answer
        records.append({"line": example.line, "answer": example.answer, "prediction": prediction,
                        "perplexities": ppl})
    return {"accuracy": correct / max(len(examples), 1), "examples": len(examples)}, records
