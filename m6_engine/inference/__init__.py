"""Inference with M6 (paper §4): KV-cache decoding under the prefix mask, and scoring.

    prompts = [m6_prompt(layout, masked_ids, patches), ...]            # inputs
    generate(model, prompts, GenerationConfig(num_beams=5), stop_id=layout.sep_id)
    score(model, Prompt(masked_ids, patches), [complete_text(layout, ids), ...])

``model`` is a whole (pp = 1) ``M6Model`` in eval mode, with any tp; ``loading`` builds one from
a checkpoint of any layout. Modules: ``inputs`` (prompts and their packed rows), ``kv_cache`` (the
cache's storage, and the model's own blocks run with it), ``steppers`` (cached vs recomputed
next-token logits), ``processors`` (n-gram ban, temperature, top-k, top-p), ``decode`` (greedy,
sampling), ``beam`` (beam search), ``score`` (log-likelihood, perplexity), ``loading`` (checkpoint,
tokenizer, image).
"""

from m6_engine.inference.common import GenerationConfig, Generated
from m6_engine.inference.decode import generate
from m6_engine.inference.inputs import Prompt, complete_text, m6_prompt, pack_prompts
from m6_engine.inference.kv_cache import KVCache, extend, prefill, vocab_logits
from m6_engine.inference.score import CandidateScore, score

__all__ = [
    "CandidateScore", "GenerationConfig", "Generated", "KVCache", "Prompt", "complete_text", "extend",
    "generate", "m6_prompt", "pack_prompts", "prefill", "score", "vocab_logits",
]
