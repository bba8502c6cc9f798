"""Decoding settings (:class:`GenerationConfig`), results (:class:`Generated`) and length budgets."""

from dataclasses import dataclass
from typing import Sequence

from m6_engine.config import ConfigError
from m6_engine.inference.inputs import Prompt

EARLY_STOPPING = (True, False, "never")


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode."""

    max_new_tokens: int = 64
    """Most tokens to generate per prompt, the stop token included."""
    num_beams: int = 1
    """1: greedy or sampling; > 1: beam search with this many beams (the paper captions with 5)."""
    do_sample: bool = False
    """Sample the next token instead of taking the most likely one (num_beams = 1 only)."""
    temperature: float = 1.0
    """Sampling: logits are divided by it."""
    top_k: int = 0
    """Sampling: keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Sampling: keep the smallest set of likely tokens with this probability mass; 1 keeps all."""
    seed: int = 0
    """Sampling: seed of the draws."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores sum(log p) / length ** length_penalty."""
    early_stopping: bool | str = False
    """Beam search: True stops a prompt once num_beams beams finished; False stops when no running
    beam can still beat the worst finished one at its current length; "never" also considers
    the longest possible length when length_penalty > 0 (Hugging Face's meanings)."""
    no_repeat_ngram_size: int = 0
    """Forbid any n-gram of this size from occurring twice in the complete text; 0 disables."""
    use_cache: bool = True
    """Decode with the KV cache; False recomputes every whole sequence per token (reference)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"GenerationConfig.num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ConfigError("GenerationConfig.do_sample needs num_beams = 1 (beam search is not sampled)")
        if self.temperature <= 0:
            raise ConfigError(f"GenerationConfig.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"GenerationConfig.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.early_stopping not in EARLY_STOPPING:
            raise ConfigError(f"GenerationConfig.early_stopping must be one of {EARLY_STOPPING}, "
                              f"got {self.early_stopping!r}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError("GenerationConfig.no_repeat_ngram_size must be >= 0, got "
                              f"{self.no_repeat_ngram_size}")


@dataclass(frozen=True)
class Generated:
    """One prompt's continuation."""

    tokens: tuple
    """The generated token ids, without the stop token."""
    stopped: bool
    """True when the text ended with the stop token, False when it ran out of length."""
    score: float
    """Sum of log-probabilities (greedy, sampling) or the length-penalised beam score."""


def token_budgets(model, prompts: Sequence[Prompt], max_new_tokens: int) -> list[int]:
    """Per prompt: at most ``max_new_tokens``, and no more than keep the fed-back tokens inside
    the position table (the last generated token is never fed back)."""
    limit = model.config.max_text_positions
    budgets = []
    for i, p in enumerate(prompts):
        if not p.complete_ids:
            raise ValueError(f"prompt {i} has no complete-text opening to decode from (M6: [CLS])")
        if len(p.complete_ids) > limit:
            raise ValueError(f"prompt {i}: its complete text opening has {len(p.complete_ids)} "
                             f"tokens, the model has {limit} complete-text positions")
        budgets.append(min(max_new_tokens, limit - len(p.complete_ids) + 1))
    return budgets
