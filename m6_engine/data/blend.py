"""Weighted blending of several corpora into one sample stream, as Megatron's ``BlendedDataset``.

Global sample ``g`` comes from the corpus furthest behind its share: the ``d`` that maximises
``w_d * max(g, 1) - n_d``, with ``w`` the weights normalised to sum 1 and ``n_d`` the samples
corpus ``d`` gave before ``g`` (the first such ``d`` on a tie). That is the rule of Megatron's
``build_blending_indices``, so after any ``n`` samples each corpus has given its share ``w_d n``
to within about one sample. Megatron precomputes the choices into an array per run; the rule
needs only the counts, so here it runs online: a blend's whole state is its counts, which the
dataset checkpoints, and resuming continues the same sequence.
"""

import math
from typing import List, Sequence


def normalized_weights(weights: Sequence[float], where: str = "weights") -> List[float]:
    """``weights`` scaled to sum 1; each must be a finite number > 0."""
    values = [float(w) for w in weights]
    if not values:
        raise ValueError(f"{where}: give at least one corpus")
    bad = [w for w in values if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"{where}: every weight must be a finite number > 0, got {values}")
    total = sum(values)
    return [w / total for w in values]


def blend_choice(weights: Sequence[float], counts: Sequence[int], g: int) -> int:
    """The corpus of global sample ``g``, given the samples ``counts`` each gave before it (module doc)."""
    target = float(max(g, 1))
    best, best_error = 0, weights[0] * target - counts[0]
    for d in range(1, len(weights)):
        error = weights[d] * target - counts[d]
        if error > best_error:
            best, best_error = d, error
    return best
