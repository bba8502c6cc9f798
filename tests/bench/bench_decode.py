"""KV-cache decoding vs recomputing the whole sequence per token (figures, not pass/fail).

The ``tiny`` M6 (4 layers, d 128, the real 21128-word vocabulary), fp32 on the CPU, one
process with one intra-op thread by default (small decoding ops gain little from more, and a
shared machine makes several threads' timings erratic). Each prompt is multimodality-to-text: 16 image patches + a 48-token masked text, then
[CLS]; greedy decoding of exactly 64 new tokens (no stop token), for batches of 1, 8 and 32
prompts.

* cached: the prompt is encoded once, then one token per row per step against the KV cache
  (``m6_engine.inference.CachedStepper``);
* recompute: every step reruns ``M6Model.hidden_states`` on every whole sequence so far
  (``RecomputeStepper``), the same model code training runs; the head runs on the last
  position only in both.

Reported: tokens/s of each (generated tokens / wall time of the whole generation, median of
interleaved runs), the speed-up (target >= 5x) and whether both produced the same tokens.

Usage: ``python -m tests.bench.bench_decode --out DIR`` (writes ``DIR/bench_decode.json``), or
``run(out_dir)`` from another script.
"""

import argparse
import dataclasses

import torch

from tests.bench.common import print_table, time_fns, write_json

NEW_TOKENS = 64
PROMPT_TOKENS = 48
BATCHES = (1, 8, 32)


def _prompts(layout, batch: int):
    from m6_engine.inference import m6_prompt

    gen = torch.Generator().manual_seed(0)
    return [m6_prompt(layout, torch.randint(1000, 8000, (PROMPT_TOKENS,), generator=gen).tolist(),
                      torch.randn(layout.num_patches, layout.patch_feature_dim, generator=gen))
            for _ in range(batch)]


def run(out_dir: str = "bench-results", iters: int = 3, threads: int = 1) -> dict:
    from m6_engine.config import model_preset
    from m6_engine.data.tasks import SampleLayout
    from m6_engine.inference import GenerationConfig, generate
    from m6_engine.model import M6Model
    from m6_engine.parallel import initialize

    torch.set_num_threads(threads)
    state = initialize(1, 1)
    config = model_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    model = M6Model(config, state, seed=0).eval()
    layout = SampleLayout(config.num_patches, config.patch_feature_dim, config.max_text_positions,
                          pad_id=0, cls_id=101, sep_id=102, mask_id=103)
    cached_config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    recompute_config = dataclasses.replace(cached_config, use_cache=False)
    rows, result = [], {"new_tokens": NEW_TOKENS, "threads": torch.get_num_threads(),
                        "prompt": f"16 patches + {PROMPT_TOKENS} masked tokens + [CLS]",
                        "fused_ops": config.fused_kernels, "batches": {}}
    for batch in BATCHES:
        prompts = _prompts(layout, batch)
        outputs = {}

        def decode(name, generation):
            return lambda: outputs.__setitem__(name, generate(model, prompts, generation, None))

        seconds = time_fns({"cached": decode("cached", cached_config),
                            "recompute": decode("recompute", recompute_config)}, "cpu", warmup=1, iters=iters)
        tokens = batch * NEW_TOKENS
        same = [r.tokens for r in outputs["cached"]] == [r.tokens for r in outputs["recompute"]]
        entry = {"cached_tokens_per_s": tokens / seconds["cached"],
                 "recompute_tokens_per_s": tokens / seconds["recompute"],
                 "speedup": seconds["recompute"] / seconds["cached"], "same_tokens": same}
        result["batches"][batch] = entry
        rows.append([batch, entry["cached_tokens_per_s"], entry["recompute_tokens_per_s"],
                     entry["speedup"], same])
    print_table(f"greedy decoding of {NEW_TOKENS} tokens, tiny M6, CPU fp32 (target speed-up >= 5)",
                ["batch", "cached tok/s", "recompute tok/s", "speed-up", "same tokens"], rows)
    write_json(out_dir, "bench_decode", result)
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args()
    run(args.out, args.iters, args.threads)
