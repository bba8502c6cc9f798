"""Held-out captioning and question answering on a preprocessed image-text corpus (the demo's check).

The corpus is what ``python -m m6_engine.data.preprocess`` wrote (``<prefix>_text`` paired with
``<prefix>_image``). Its image documents are split as the dataset splits them
(:mod:`m6_engine.data.dataset`): a document holding the answer marker ("答：") is a question-answer
text, any other one a caption. For each:

* caption: the image alone is the prefix, the caption is generated from ``[CLS]``;
* question: the image + the question up to and including the marker is the prefix, the answer is
  generated;

and a prediction is right when its tokens equal the reference's exactly. For the synthetic shapes
set that means colour, shape and position (and count) all right.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from m6_engine.data import indexed
from m6_engine.data.preprocess import image_prefix, text_prefix
from m6_engine.inference import GenerationConfig, generate, m6_prompt


@dataclass
class Prediction:
    kind: str
    """"caption" or "question"."""
    prompt: str
    """The question (empty for a caption)."""
    predicted: str
    reference: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.reference


@dataclass
class HeldOutResult:
    predictions: list[Prediction] = field(default_factory=list)

    def accuracy(self, kind: str) -> float:
        chosen = [p for p in self.predictions if p.kind == kind]
        return sum(p.correct for p in chosen) / len(chosen) if chosen else float("nan")

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.predictions)


def _split_at(ids: np.ndarray, marker: list[int]) -> int:
    """Index just after the first occurrence of ``marker`` in ``ids``, or -1."""
    m = len(marker)
    for i in range(len(ids) - m + 1):
        if ids[i:i + m].tolist() == marker:
            return i + m
    return -1


def held_out_items(corpus: str, tokenizer, answer_marker: str = "答：", limit: int = 0):
    """(kind, prefix ids, reference ids, patches (16, F) fp32) of every image document, captions
    and questions interleaved as stored; ``limit`` > 0 keeps the first ``limit`` of each kind."""
    texts = indexed.open_tokens(text_prefix(corpus))
    images = indexed.open_patches(image_prefix(corpus))
    marker = tokenizer.encode(answer_marker)
    taken = {"caption": 0, "question": 0}
    for doc in range(len(texts)):
        row = int(texts.image_ids[doc])
        if row < 0:
            continue
        ids = np.asarray(texts[doc], dtype=np.int64)
        split = _split_at(ids, marker) if marker else -1
        kind = "question" if 0 <= split < len(ids) else "caption"
        if limit and taken[kind] >= limit:
            continue
        taken[kind] += 1
        prefix, reference = (ids[:split], ids[split:]) if kind == "question" else (ids[:0], ids)
        yield kind, prefix.tolist(), reference.tolist(), torch.from_numpy(np.asarray(images[row], dtype=np.float32))


def evaluate_held_out(model, layout, tokenizer, corpus: str, *, limit: int = 0, batch_size: int = 32,
                      max_new_tokens: int = 48) -> HeldOutResult:
    """Greedy-decode every held-out caption and answer (batched, KV cache) and compare exactly."""
    items = list(held_out_items(corpus, tokenizer, limit=limit))
    result = HeldOutResult()
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [m6_prompt(layout, prefix, patches) for _, prefix, _, patches in chunk]
        with torch.no_grad():
            outputs = generate(model, prompts, config, stop_id=layout.sep_id)
        for (kind, prefix, reference, _), out in zip(chunk, outputs):
            tokens = [t for t in out.tokens if t != layout.sep_id]
            result.predictions.append(Prediction(
                kind, tokenizer.decode(prefix).replace(" ", ""), tokenizer.decode(tokens).replace(" ", ""),
                tokenizer.decode(reference).replace(" ", "")))
    return result
