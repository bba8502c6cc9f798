"""Next-token score processing: repeated n-gram ban, temperature, top-k and top-p (nucleus).

All act on fp32 scores (R, V), one row per sequence, and return a new tensor; a removed token
gets -inf. Sampling applies temperature, then top-k, then top-p, in that order (as Hugging Face
does), so the same settings mean the same distribution.
"""

from typing import Sequence

import torch


def ban_repeated_ngrams(scores: torch.Tensor, histories: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """No n-gram may occur twice in a row's history: a token that would complete an n-gram
    already in the history (its n - 1 predecessors equal the history's last n - 1 tokens) gets
    -inf. ``histories[r]`` is row r's complete text so far; n <= 0 disables the ban."""
    if n <= 0:
        return scores
    out = scores.clone()
    for r, history in enumerate(histories):
        if len(history) + 1 < n:
            continue
        tail = tuple(history[len(history) - n + 1:]) if n > 1 else ()
        banned = [history[i + n - 1] for i in range(len(history) - n + 1)
                  if tuple(history[i:i + n - 1]) == tail]
        if banned:
            out[r, banned] = float("-inf")
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T: T < 1 sharpens, T > 1 flattens the distribution."""
    return logits if temperature == 1.0 else logits / temperature


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest scores of each row (ties with the k-th kept); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                      # (R, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least one
    token); p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                                 # (R, V)
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the logits sampling draws from."""
    return keep_top_p(keep_top_k(apply_temperature(logits, temperature), top_k), top_p)
