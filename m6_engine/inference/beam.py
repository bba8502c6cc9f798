"""Beam search over batched prompts, with Hugging Face ``generate``'s semantics.

Per prompt, N running beams (one row each in the stepper, R = prompts x N rows). At step t
(t tokens generated so far), with log p the log-softmax of the next-token logits (repeated
n-grams banned) and s_j the running score of beam j:

1. candidates: the 2N best (beam j, token v) by s_j + log p_j(v) over all N x V pairs (2N so
   that N non-finished candidates remain even if up to N of them end here);
2. a candidate *hits* when v is the stop token or the prompt's length budget is reached;
3. the next running beams are the N best candidates that do not hit;
4. a hitting candidate among the first N becomes a finished hypothesis with score
   (s_j + log p_j(v)) / (t + 1) ** length_penalty (t + 1 tokens, the stop token included); the
   N best finished hypotheses are kept;
5. a prompt is done when all N kept hypotheses are finished and early_stopping is True, when no
   running beam can beat the worst finished one (early_stopping False: at its current length;
   "never" with length_penalty > 0: at the longest possible length), or at its length budget.

The result is the best finished hypothesis. Done prompts leave the batch (their rows are dropped
from the cache); the beams of the others are reordered in the cache at every step.
"""

import torch

from m6_engine.inference.common import Generated, token_budgets
from m6_engine.inference.processors import ban_repeated_ngrams
from m6_engine.inference.steppers import make_stepper

NEG = -1.0e9
"""Score that removes a candidate (finite, so sums stay ordered as in the reference)."""


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, K, ...) gathered along dim 1 by index (B, K')."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


class _Beams:
    """Beam state of the prompts still running; every tensor is (B, N, ...) or (B, ...)."""

    def __init__(self, n_prompts: int, n: int, length: int, device):
        self.running_seqs = torch.zeros(n_prompts, n, length, dtype=torch.long, device=device)
        self.running_scores = torch.full((n_prompts, n), NEG, device=device)
        self.running_scores[:, 0] = 0.0          # all beams start equal: let only beam 0 expand
        self.final_seqs = torch.zeros_like(self.running_seqs)
        self.final_len = torch.zeros(n_prompts, n, dtype=torch.long, device=device)
        self.final_scores = torch.full((n_prompts, n), NEG, device=device)
        self.is_final = torch.zeros(n_prompts, n, dtype=torch.bool, device=device)
        self.improvable = torch.ones(n_prompts, dtype=torch.bool, device=device)

    def keep(self, index: torch.Tensor) -> None:
        for name in ("running_seqs", "running_scores", "final_seqs", "final_len", "final_scores",
                     "is_final", "improvable"):
            setattr(self, name, getattr(self, name)[index])


def _finish(beams: _Beams, cand_seqs, cand_scores, hits, t: int, config) -> None:
    """Step 4: merge this step's finished candidates into the kept hypotheses."""
    n = beams.final_scores.shape[1]
    first_n = torch.zeros_like(hits)
    first_n[:, :n] = True
    new_final = hits & first_n
    scores = cand_scores / float(t + 1) ** config.length_penalty
    full = beams.is_final.all(dim=1, keepdim=True) & (config.early_stopping is True)
    scores = scores + NEG * (full | ~beams.improvable[:, None] | ~new_final).float()
    merged_scores = torch.cat([beams.final_scores, scores], dim=1)
    best = torch.topk(merged_scores, n, dim=1).indices
    beams.final_scores = _take(merged_scores, best)
    beams.final_seqs = _take(torch.cat([beams.final_seqs, cand_seqs], dim=1), best)
    lengths = torch.full_like(hits, t + 1, dtype=torch.long)
    beams.final_len = _take(torch.cat([beams.final_len, lengths], dim=1), best)
    beams.is_final = _take(torch.cat([beams.is_final, new_final], dim=1), best)


def _prompt_done(beams: _Beams, hits, t: int, budgets: torch.Tensor, config) -> torch.Tensor:
    """Step 5 for each running prompt (B,)."""
    lp = config.length_penalty
    length = torch.full_like(budgets, t + 1)
    if config.early_stopping == "never" and lp > 0:
        length = budgets
    best_possible = beams.running_scores[:, 0] / length.float() ** lp               # (B,)
    worst = beams.final_scores.min(dim=1, keepdim=True).values
    worst_final = torch.where(beams.is_final, worst, torch.full_like(beams.final_scores, NEG))
    beams.improvable &= (best_possible[:, None] > worst_final).any(dim=1)
    all_final = beams.is_final.all(dim=1) & (config.early_stopping is True)
    return ~beams.improvable | all_final | hits.all(dim=1)


def _result(beams: _Beams, b: int, stop_id) -> Generated:
    length = int(beams.final_len[b, 0])
    tokens = beams.final_seqs[b, 0, :length].tolist()
    stopped = bool(tokens) and tokens[-1] == stop_id
    return Generated(tuple(tokens[:-1] if stopped else tokens), stopped, float(beams.final_scores[b, 0]))


def beam_search(model, prompts, config, stop_id):
    """``decode.generate`` with ``config.num_beams`` > 1 (module docstring)."""
    n = config.num_beams
    budgets_list = token_budgets(model, prompts, config.max_new_tokens)
    if 2 * n > model.config.vocab_size:
        raise ValueError(f"beam search keeps 2 x num_beams = {2 * n} candidates; the vocabulary has "
                         f"only {model.config.vocab_size}")
    stepper = make_stepper(model, max(budgets_list), config.use_cache)
    logits = stepper.start(prompts)                                                 # (B, V)
    device = logits.device
    budgets = torch.tensor(budgets_list, device=device)
    live = list(range(len(prompts)))
    stepper.select(torch.arange(len(prompts)).repeat_interleave(n))
    logits = logits.repeat_interleave(n, dim=0)                                      # (B N, V)
    beams = _Beams(len(prompts), n, max(budgets_list), device)
    results = [None] * len(prompts)
    for t in range(max(budgets_list)):
        b_live, vocab = len(live), logits.shape[-1]
        histories = [list(prompts[i].complete_ids) + beams.running_seqs[k, j, :t].tolist()
                     for k, i in enumerate(live) for j in range(n)]
        logp = ban_repeated_ngrams(torch.log_softmax(logits, dim=-1), histories, config.no_repeat_ngram_size)
        total = (logp.view(b_live, n, vocab) + beams.running_scores[:, :, None]).view(b_live, n * vocab)
        cand_scores, flat = torch.topk(total, 2 * n, dim=1)                          # (B, 2N) sorted
        source, token = flat // vocab, flat % vocab
        cand_seqs = _take(beams.running_seqs, source).clone()                        # (B, 2N, L)
        cand_seqs[:, :, t] = token
        hits = (t + 1 >= budgets)[:, None].expand_as(token).clone()
        if stop_id is not None:
            hits |= token == stop_id
        running_pick = cand_scores + NEG * hits.float()
        nxt = torch.topk(running_pick, n, dim=1).indices                             # (B, N)
        beams.running_seqs = _take(cand_seqs, nxt)
        beams.running_scores = _take(running_pick, nxt)
        _finish(beams, cand_seqs, cand_scores, hits, t, config)
        done = _prompt_done(beams, hits, t, budgets, config)
        for k in torch.nonzero(done).flatten().tolist():
            results[live[k]] = _result(beams, k, stop_id)
        if bool(done.all()):
            break
        keep = torch.nonzero(~done).flatten()
        rows = (keep[:, None] * n + _take(source, nxt)[keep]).flatten()               # beams' parents
        stepper.select(rows)
        beams.keep(keep)
        budgets = budgets[keep]
        live = [live[k] for k in keep.tolist()]
        logits = stepper.step(beams.running_seqs[:, :, t].flatten())
    return results
