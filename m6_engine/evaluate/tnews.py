"""Zero-shot news classification in the TNEWS protocol (paper §4.1.2, table 7; after CPM).

Input: CLUE TNEWS JSON-lines, one news title per line with ``sentence`` (the title),
``keywords`` (may be empty or absent) and ``label_desc`` (e.g. ``news_sports``). Each label is
written as a Chinese word (:data:`LABEL_WORDS`, replaceable by a JSON object file
``{"label_desc": "word"}``).

Per example and seed: the candidates are the true label and 3 other labels drawn at random,
shuffled; each fills the template

    标题: <title> ; 关键词: <keywords> ; 分类: <label word>

which is scored as a whole complete text after an empty prefix (language modelling); the label
whose text has the lowest perplexity is the prediction. Accuracy is averaged over the seeds
(3 in the paper). Templates longer than the text positions lose keyword tokens first, then
title tokens, never the label.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from m6_engine.evaluate.records import DataFormatError, read_json_lines

LABEL_WORDS = {
    "news_story": "故事", "news_culture": "文化", "news_entertainment": "娱乐", "news_sports": "体育",
    "news_finance": "财经", "news_house": "房产", "news_car": "汽车", "news_edu": "教育",
    "news_tech": "科技", "news_military": "军事", "news_travel": "旅游", "news_world": "国际",
    "news_stock": "股票", "news_agriculture": "农业", "news_game": "游戏",
}
"""CLUE TNEWS's 15 labels as Chinese words."""
TEMPLATE = ("标题:", ";关键词:", ";分类:")
"""The text before the title, the keywords and the label (spaces do not survive tokenisation)."""
NEGATIVES = 3
SEEDS = (1, 2, 3)


@dataclass(frozen=True)
class TNEWSExample:
    title: str
    keywords: str
    label: str
    line: int
    """Line of the input file (for predictions and errors)."""


def load_label_words(path) -> dict:
    """A label -> word table from a JSON object file."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in table.items()):
        raise DataFormatError(f"{path}: expected a JSON object of label -> non-empty word strings")
    if len(table) < NEGATIVES + 1:
        raise DataFormatError(f"{path}: needs at least {NEGATIVES + 1} labels for 4-way choices, "
                              f"has {len(table)}")
    return table


def read_tnews(path, label_words: dict) -> list[TNEWSExample]:
    """Examples of a TNEWS JSON-lines file; unknown labels are errors naming the line."""
    examples = []
    for line, obj in read_json_lines(path, {"sentence": str, "label_desc": str}):
        keywords = obj.get("keywords", "")
        if not isinstance(keywords, str):
            raise DataFormatError(f"{path}:{line}: field 'keywords' must be str, got "
                                  f"{type(keywords).__name__}")
        if obj["label_desc"] not in label_words:
            raise DataFormatError(f"{path}:{line}: label_desc {obj['label_desc']!r} is not in the "
                                  f"label table ({sorted(label_words)})")
        examples.append(TNEWSExample(obj["sentence"], keywords, obj["label_desc"], line))
    return examples


def candidate_labels(labels: Sequence[str], true_label: str, seed: int, index: int) -> list[str]:
    """The true label and NEGATIVES others, drawn and shuffled by (seed, example index)."""
    rng = np.random.default_rng([seed, index])
    others = sorted(label for label in labels if label != true_label)
    picked = [others[i] for i in rng.choice(len(others), NEGATIVES, replace=False)]
    return [([true_label] + picked)[i] for i in rng.permutation(NEGATIVES + 1)]


def template_ids(tokenizer, example: TNEWSExample, word: str, budget: int) -> list[int]:
    """Token ids of the filled template, cut to ``budget`` tokens (keywords, then title)."""
    head, kw_head, label_head = (tokenizer.encode(t) for t in TEMPLATE)
    title, keywords = tokenizer.encode(example.title), tokenizer.encode(example.keywords)
    label = tokenizer.encode(word)
    excess = len(head) + len(title) + len(kw_head) + len(keywords) + len(label_head) + len(label) - budget
    if excess > 0:
        cut = min(excess, len(keywords))
        keywords = keywords[:len(keywords) - cut]
        title = title[:max(0, len(title) - (excess - cut))]
    ids = head + title + kw_head + keywords + label_head + label
    if len(ids) > budget:
        raise ValueError(f"the TNEWS template alone needs {len(ids)} tokens, more than {budget}")
    return ids


def evaluate_tnews(backend, tokenizer, examples: Sequence[TNEWSExample], label_words: dict,
                   max_text_positions: int, seeds: Sequence[int] = SEEDS) -> tuple[dict, list[dict]]:
    """({"accuracy": mean over seeds, "accuracy_per_seed": [...], "examples": n}, per-example records)."""
    labels = sorted(label_words)
    budget = max_text_positions - 2                         # [CLS] and [SEP]
    correct = np.zeros(len(seeds))
    records = []
    for index, example in enumerate(examples):
        rounds = [candidate_labels(labels, example.label, seed, index) for seed in seeds]
        needed = sorted({label for cands in rounds for label in cands})
        texts = [template_ids(tokenizer, example, label_words[label], budget) for label in needed]
        ppl = dict(zip(needed, backend.perplexities((), texts)))
        record = {"line": example.line, "label": example.label, "rounds": []}
        for k, (seed, cands) in enumerate(zip(seeds, rounds)):
            prediction = min(cands, key=lambda label: ppl[label])    # ties: the earlier candidate
            correct[k] += prediction == example.label
            record["rounds"].append({"seed": seed, "candidates": cands,
                                     "perplexities": [ppl[c] for c in cands], "prediction": prediction})
        records.append(record)
    per_seed = (correct / max(len(examples), 1)).tolist()
    return {"accuracy": float(np.mean(per_seed)), "accuracy_per_seed": per_seed,
            "examples": len(examples)}, records
