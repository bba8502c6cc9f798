"""Text generation with M6: greedy, sampling and (``beam``) beam search over batched prompts.

    generate(model, prompts, config, stop_id) -> [Generated(tokens, stopped, score), ...]

Each prompt (``inputs.Prompt``: patches, masked text, complete-text opening) is continued one
token at a time until it produces ``stop_id`` ([SEP] for M6) or ``config.max_new_tokens`` tokens;
a prompt's budget is also cut so that every token fed back stays inside the learned position
table (``max_text_positions`` complete-text positions). Rows of a batch may have different
prefix and prompt lengths; finished rows leave the batch.

Per step, for the rows still running (``processors``):

    greedy:    next = argmax(scores)
    sampling:  next ~ softmax(top_p(top_k(logits / temperature)))   from a generator seeded by
               ``config.seed`` (the same draws on every tp rank: the logits are gathered)

where scores are the logits with repeated n-grams banned (``no_repeat_ngram_size``) over the
row's complete text. ``Generated.score`` is the sum of the chosen tokens' log-probabilities under
the unmodified model (greedy, sampling) or the beam score (beam search).
"""

from typing import Sequence

import torch

from m6_engine.inference.beam import beam_search
from m6_engine.inference.common import GenerationConfig, Generated, token_budgets
from m6_engine.inference.inputs import Prompt
from m6_engine.inference.processors import ban_repeated_ngrams, sampling_logits
from m6_engine.inference.steppers import make_stepper


@torch.no_grad()
def generate(model, prompts: Sequence[Prompt], config: GenerationConfig,
             stop_id: int | None) -> list[Generated]:
    """Continue every prompt (module docstring); ``stop_id`` None runs to the length budget."""
    if config.num_beams > 1:
        return beam_search(model, prompts, config, stop_id)
    return _greedy_or_sample(model, prompts, config, stop_id)


def _greedy_or_sample(model, prompts, config: GenerationConfig, stop_id) -> list[Generated]:
    budgets = token_budgets(model, prompts, config.max_new_tokens)
    stepper = make_stepper(model, max(budgets), config.use_cache)
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=model.device).manual_seed(config.seed)
    histories = [list(p.complete_ids) for p in prompts]
    produced: list[list[int]] = [[] for _ in prompts]
    log_prob = [0.0] * len(prompts)
    results: list[Generated | None] = [None] * len(prompts)
    live = list(range(len(prompts)))                     # prompt index of each stepper row
    logits = stepper.start(prompts)                      # (R, V) fp32
    while True:
        scores = ban_repeated_ngrams(logits, [histories[i] for i in live], config.no_repeat_ngram_size)
        if config.do_sample:
            probs = torch.softmax(sampling_logits(scores, config.temperature, config.top_k, config.top_p), -1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            chosen = scores.argmax(dim=-1)
        chosen_lp = (logits.gather(1, chosen[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).tolist()
        keep = []
        for row, (i, token) in enumerate(zip(live, chosen.tolist())):
            log_prob[i] += chosen_lp[row]
            stopped = token == stop_id
            if not stopped:
                produced[i].append(token)
                histories[i].append(token)
            if stopped or len(produced[i]) >= budgets[i]:
                results[i] = Generated(tuple(produced[i]), stopped, log_prob[i])
            else:
                keep.append(row)
        if not keep:
            return results
        if len(keep) < len(live):
            rows = torch.tensor(keep, dtype=torch.long)
            stepper.select(rows)
            chosen = chosen[rows.to(chosen.device)]
            live = [live[r] for r in keep]
        logits = stepper.step(chosen)
