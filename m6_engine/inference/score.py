"""Scoring candidate complete texts after one prefix: log-likelihood and perplexity.

A candidate is a whole complete text c_0 .. c_n (M6: ``[CLS] t_1 .. t_m [SEP]``, see
``inputs.complete_text``). As in training, position p predicts token p + 1, so with the prefix
(patches, masked text) encoded bidirectionally:

    log_likelihood = sum_{p=1..n} log P(c_p | prefix, c_0 .. c_{p-1})       n = num_tokens
    perplexity     = exp(-log_likelihood / n)

and -log_likelihood / n is exactly the training loss of the packed sample (prefix, candidate).
The prefix is encoded once into a KV cache, then all candidates are appended to copies of it in
one pass (the cursors are the fused op's per-sample ``q_offset``); the token losses come from
the training loss's own ``vocab_parallel_cross_entropy``.
"""

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from m6_engine.data.batch import MicroBatch
from m6_engine.data.tasks import SEGMENT_COMPLETE
from m6_engine.inference.inputs import Prompt, pack_prompts
from m6_engine.inference.kv_cache import KVCache, check_decodable, extend
from m6_engine.parallel.cross_entropy import vocab_parallel_cross_entropy


@dataclass(frozen=True)
class CandidateScore:
    """How well the model predicts one candidate complete text."""

    log_likelihood: float
    """Sum of the log-probabilities of the candidate's tokens 1..n (fp32 math)."""
    num_tokens: int
    """n: the predicted tokens (the candidate's length minus its first token)."""

    @property
    def mean_loss(self) -> float:
        """-log_likelihood / n: the training loss of this sample."""
        return -self.log_likelihood / self.num_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)


def _prefix_cache(model, prefix: Prompt | None, rows: int, capacity_after: int) -> KVCache:
    """A cache of ``rows`` copies of the encoded prefix, with ``capacity_after`` free slots."""
    if prefix is None or not prefix.has_prefix:
        return KVCache(model, rows, capacity_after)
    config = model.config
    packed = pack_prompts([prefix], config.num_patches, config.patch_feature_dim)
    length = int(packed.valid_len[0])
    cache = KVCache(model, 1, length)
    extend(model, cache, packed)
    cache.reorder(torch.zeros(rows, dtype=torch.long), capacity=length + capacity_after)
    return cache


@torch.no_grad()
def score(model, prefix: Prompt | None, candidates: Sequence[Sequence[int]]) -> list[CandidateScore]:
    """Log-likelihood of every candidate complete text after ``prefix`` (module docstring).

    ``prefix``: a :class:`Prompt` of patches and masked text only (no complete text: that is
    each candidate's), or None for an empty prefix (language modelling).
    """
    check_decodable(model)
    if prefix is not None and prefix.complete_ids:
        raise ValueError("the prefix of score() is patches and masked text only; put the whole "
                         "complete text in each candidate")
    if not candidates:
        raise ValueError("score() needs at least one candidate")
    lengths = [len(c) for c in candidates]
    if min(lengths) < 2:
        raise ValueError("every candidate needs at least two tokens (a first token and one to predict)")
    if max(lengths) > model.config.max_text_positions:
        raise ValueError(f"a candidate has {max(lengths)} tokens; the model has "
                         f"{model.config.max_text_positions} complete-text positions")
    n, width = len(candidates), max(lengths)
    cache = _prefix_cache(model, prefix, n, width)
    tokens = torch.zeros(n, width, dtype=torch.long)
    for i, c in enumerate(candidates):
        tokens[i, :len(c)] = torch.tensor(list(c), dtype=torch.long)
    new_len = torch.tensor(lengths, dtype=torch.long)
    batch = MicroBatch(tokens=tokens, position_ids=torch.arange(width).expand(n, width),
                       segment_ids=torch.full((n, width), SEGMENT_COMPLETE, dtype=torch.long),
                       prefix_len=torch.zeros(n, dtype=torch.long), valid_len=new_len)   # no bidirectional part
    hidden = extend(model, cache, batch)                                            # (N, T, d)
    device = hidden.device
    # As the training loss: logits of the predicting positions only (no pad rows).
    predicting = torch.arange(width, device=device)[None, :] < (new_len - 1).to(device)[:, None]
    rows = predicting.nonzero(as_tuple=True)                                        # (M,), (M,)
    shard_logits = model.embedding.word.logits(hidden[rows])                        # (M, V/t)
    targets = tokens.to(device)[rows[0], rows[1] + 1]                               # (M,)
    token_loss = vocab_parallel_cross_entropy(shard_logits, targets, model.state,   # (M,) fp32
                                              overwrite_logits=True)  # never read again
    log_likelihood = -torch.zeros(n, device=device).index_add(0, rows[0], token_loss)
    return [CandidateScore(float(ll), length - 1) for ll, length in zip(log_likelihood.tolist(), lengths)]
