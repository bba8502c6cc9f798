"""What the zero-shot protocols ask of a model: perplexities of candidate texts, and generations.

The protocols see token ids only (:class:`Backend`), so their file parsing, prompt building and
metric math are tested with a stand-in; :class:`ModelBackend` answers with an M6 model.
"""

from typing import Protocol, Sequence

from m6_engine.data.tasks import SampleLayout
from m6_engine.inference import GenerationConfig, Prompt, complete_text, generate, m6_prompt, score


class Backend(Protocol):
    def perplexities(self, masked_ids: Sequence[int], texts: Sequence[Sequence[int]]) -> list[float]:
        """Perplexity of each text (ids without specials) as the complete text after the masked text."""

    def generate(self, masked_texts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The generated complete text (ids, no specials) after each masked text."""


class ModelBackend:
    """:class:`Backend` of a whole M6 model in eval mode (``m6_engine.inference``)."""

    def __init__(self, model, layout: SampleLayout, generation: GenerationConfig, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.layout, self.generation, self.batch_size = model, layout, generation, batch_size

    def perplexities(self, masked_ids, texts):
        prefix = Prompt(masked_ids=masked_ids) if masked_ids else None
        scores = score(self.model, prefix, [complete_text(self.layout, t) for t in texts])
        return [s.perplexity for s in scores]

    def generate(self, masked_texts):
        out = []
        for start in range(0, len(masked_texts), self.batch_size):
            prompts = [m6_prompt(self.layout, ids) for ids in masked_texts[start:start + self.batch_size]]
            results = generate(self.model, prompts, self.generation, self.layout.sep_id)
            out += [list(g.tokens) for g in results]
        return out
