"""The two ways a decoder gets next-token logits: from a KV cache, or by recomputing everything.

Both have one interface, so greedy, sampling and beam search run unchanged on either:

    stepper.start(prompts)  -> logits (R, V) of each prompt's next token
    stepper.step(tokens)    -> logits (R, V) after appending tokens (R,), one per row
    stepper.select(rows)    -> keep rows (R',) in that order (beams, finished rows dropped)

:class:`CachedStepper` encodes the prompts once and then runs one token per row per step
(``kv_cache``). :class:`RecomputeStepper` reruns the model's own training forward
(``M6Model.hidden_states``) on every whole sequence at every step: the reference the cache must
match token for token, and the baseline of the decoding benchmark.
"""

from typing import Sequence

import torch

from m6_engine.data.tasks import SEGMENT_COMPLETE
from m6_engine.inference.inputs import Prompt, pack_prompts
from m6_engine.inference.kv_cache import check_decodable, extend, prefill, vocab_logits


class CachedStepper:
    """KV-cache decoding: prompts encoded once, then one new token per row per step."""

    def __init__(self, model, max_new_tokens: int):
        check_decodable(model)
        self.model, self.max_new_tokens = model, max_new_tokens
        self.cache = self.prefix_len = None

    def start(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        config = self.model.config
        packed = pack_prompts(prompts, config.num_patches, config.patch_feature_dim)
        capacity = packed.batch["tokens"].shape[1] + self.max_new_tokens
        self.cache, hidden = prefill(self.model, packed, capacity)
        self.prefix_len = packed.prefix_len.to(self.cache.lengths.device)
        return vocab_logits(self.model, hidden)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cursor = self.cache.lengths                                        # (R,) slot of the new token
        batch = {"tokens": tokens.view(-1, 1),
                 "position_ids": (cursor - self.prefix_len).view(-1, 1),   # complete-text position
                 "segment_ids": torch.full_like(cursor, SEGMENT_COMPLETE).view(-1, 1)}
        # The prompt's own prefix_len: the new token's query row is its row of the training mask.
        hidden = extend(self.model, self.cache, batch, torch.ones_like(cursor), self.prefix_len)  # (R, 1, d)
        return vocab_logits(self.model, hidden[:, 0])

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.prefix_len.device)
        self.cache.reorder(rows)
        self.prefix_len = self.prefix_len.index_select(0, rows)


class RecomputeStepper:
    """No cache: every step runs the whole of every sequence through ``M6Model.hidden_states``."""

    def __init__(self, model, max_new_tokens: int):
        check_decodable(model)
        self.model = model
        self.prompts: list[Prompt] = []

    def _logits(self) -> torch.Tensor:
        config = self.model.config
        packed = pack_prompts(self.prompts, config.num_patches, config.patch_feature_dim)
        batch = {**packed.batch, "prefix_len": packed.prefix_len, "valid_len": packed.valid_len}
        with torch.no_grad():
            hidden = self.model.final_ln(self.model.hidden_states(batch))      # (R, T, d)
        last = (packed.valid_len - 1).to(hidden.device)
        return vocab_logits(self.model, hidden[torch.arange(len(self.prompts)), last])

    def start(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        self.prompts = list(prompts)
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prompts = [Prompt(p.masked_ids, p.patches, p.complete_ids + (int(t),))
                        for p, t in zip(self.prompts, tokens.tolist())]
        return self._logits()

    def select(self, rows: torch.Tensor) -> None:
        self.prompts = [self.prompts[r] for r in rows.tolist()]


def make_stepper(model, max_new_tokens: int, use_cache: bool):
    return (CachedStepper if use_cache else RecomputeStepper)(model, max_new_tokens)
