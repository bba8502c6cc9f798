"""Zero-shot reading comprehension in the CMRC 2018 protocol (paper §4.1.2, table 7).

Input: the SQuAD-style JSON of CMRC 2018: ``{"data": [{"paragraphs": [{"context": ...,
"qas": [{"id", "question", "answers": [{"text", ...}, ...]}]}]}]}``.

The paragraph and the question form the masked text, and the answer is generated as the complete
text (greedy by default):

    masked text:   <paragraph> 问题：<question>？回答：
                   (the paper's "paragraph 问题: question ? 回答:", with Chinese punctuation)

The paragraph is cut from its end so the masked text fits half of the text positions.

Metrics (CMRC 2018's official definitions, against every reference answer, best one counts, x100):
texts are lower-cased and split into tokens, each CJK character and each punctuation mark alone,
runs of other characters split at whitespace and punctuation; punctuation is then dropped.

    F1 = 2 P R / (P + R),  P = l / |prediction|,  R = l / |reference|,
         l = length of the longest common *contiguous* run of tokens
    EM = 1 when prediction and reference are equal once punctuation and spaces are removed
"""

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from m6_engine.evaluate.records import DataFormatError

QUESTION, ANSWER = "问题：", "回答："
QUESTION_MARKS = "?？"


@dataclass(frozen=True)
class CMRCQuestion:
    qid: str
    context: str
    question: str
    answers: tuple
    """Reference answer texts (at least one)."""


def _fail(path, where: str, message: str):
    raise DataFormatError(f"{path}: {where}: {message}")


def _list(path, obj, key: str, where: str) -> list:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        _fail(path, where, f"expected an object with a list {key!r}")
    return obj[key]


def read_cmrc(path) -> list[CMRCQuestion]:
    """Questions of a CMRC 2018 (SQuAD-style) JSON file; errors name the line (bad JSON) or the
    JSON path of the offending entry."""
    path = Path(path)
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column "
                              f"{error.colno})") from None
    questions = []
    for i, article in enumerate(_list(path, root, "data", "top level")):
        for j, paragraph in enumerate(_list(path, article, "paragraphs", f"data[{i}]")):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph.get("context") if isinstance(paragraph, dict) else None, str):
                _fail(path, where, "expected a string 'context'")
            for k, qa in enumerate(_list(path, paragraph, "qas", where)):
                questions.append(_question(path, qa, f"{where}.qas[{k}]", paragraph["context"]))
    if not questions:
        raise DataFormatError(f"{path}: no questions")
    return questions


def _question(path, qa, where: str, context: str) -> CMRCQuestion:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
        _fail(path, where, "expected an object with a string 'question'")
    answers = qa.get("answers")
    if not isinstance(answers, list) or not answers:
        _fail(path, where, f"question {qa.get('id')!r} has no 'answers' list")
    texts = []
    for a, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            _fail(path, f"{where}.answers[{a}]", "expected an object with a string 'text'")
        texts.append(answer["text"])
    return CMRCQuestion(str(qa.get("id", where)), context, qa["question"], tuple(texts))


def prompt_ids(tokenizer, q: CMRCQuestion, max_text_positions: int) -> list[int]:
    """Masked text ids: the paragraph (cut at its end to fit), the question, the answer marker."""
    question = q.question.rstrip().rstrip(QUESTION_MARKS)
    tail = tokenizer.encode(f"{QUESTION}{question}？{ANSWER}")
    budget = max_text_positions // 2
    if len(tail) > budget:
        raise ValueError(f"question {q.qid}: the question alone has {len(tail)} tokens, more than "
                         f"the masked-text budget {budget}")
    return tokenizer.encode(q.context)[:budget - len(tail)] + tail


# ----------------------------------------------------------------------------- metrics

def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith(("P", "S"))


def _is_cjk(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("CJK UNIFIED", "CJK COMPATIBILITY"))


def segment(text: str) -> list[str]:
    """Lower-cased tokens without punctuation: CJK characters alone, other runs split at spaces."""
    tokens, run = [], ""
    for ch in text.lower():
        if _is_cjk(ch) or _is_punctuation(ch) or ch.isspace():
            tokens += [run] if run else []
            run = ""
            if _is_cjk(ch):
                tokens.append(ch)
        else:
            run += ch
    return tokens + ([run] if run else [])


def _longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """Best F1 over the references (module docstring), in [0, 1]."""
    pred = segment(prediction)
    best = 0.0
    for reference in references:
        ref = segment(reference)
        common = _longest_common_run(pred, ref)
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference up to punctuation, spaces and case."""
    pred = "".join(segment(prediction))
    return float(any(pred == "".join(segment(r)) for r in references))


def evaluate_cmrc(backend, tokenizer, questions: Sequence[CMRCQuestion],
                  max_text_positions: int) -> tuple[dict, list[dict]]:
    """({"f1", "em" (both x100), "examples"}, per-question records)."""
    generated = backend.generate([prompt_ids(tokenizer, q, max_text_positions) for q in questions])
    records, f1_sum, em_sum = [], 0.0, 0.0
    for q, ids in zip(questions, generated):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        f1, em = f1_score(text, q.answers), exact_match(text, q.answers)
        f1_sum, em_sum = f1_sum + f1, em_sum + em
        records.append({"id": q.qid, "prediction": text, "answers": list(q.answers), "f1": f1, "em": em})
    n = max(len(questions), 1)
    return {"f1": 100 * f1_sum / n, "em": 100 * em_sum / n, "examples": len(questions)}, records
