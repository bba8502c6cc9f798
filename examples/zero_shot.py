"""Zero-shot TNEWS / ChID / CMRC 2018 with a trained M6 (paper §4.1.2).

    python examples/zero_shot.py --task tnews|chid|cmrc --checkpoint DIR --data FILE [--out preds.jsonl]

Prints the metric as one JSON line (TNEWS, ChID: accuracy; CMRC: F1 and EM, x100) and writes one
prediction record per example to --out. With tp > 1 launch under torchrun with --tp.
"""

import argparse
import json
import sys

import torch.distributed as dist

from m6_engine.checkpoint import CheckpointError
from m6_engine.config import ConfigError
from m6_engine.evaluate import (
    LABEL_WORDS, DataFormatError, ModelBackend, evaluate_chid, evaluate_cmrc, evaluate_tnews,
    load_label_words, read_chid, read_cmrc, read_tnews, write_predictions,
)
from m6_engine.evaluate.tnews import SEEDS
from m6_engine.inference import GenerationConfig
from m6_engine.inference.loading import DTYPES, load_inference_model
from m6_engine.parallel import initialize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=("tnews", "chid", "cmrc"))
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or checkpoint directory")
    p.add_argument("--data", required=True, help="the task's evaluation file")
    p.add_argument("--out", help="per-example predictions (JSON lines)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N examples only")
    p.add_argument("--label-words", help="tnews: JSON object label_desc -> Chinese word")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="tnews: negative-sampling seeds")
    p.add_argument("--beams", type=int, default=1, help="cmrc: beam size (1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="cmrc: answer length limit")
    p.add_argument("--batch-size", type=int, default=8, help="cmrc: prompts decoded together")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and KV cache")
    return p.parse_args(argv)


def evaluate(args, state) -> tuple[dict, list]:
    loaded = load_inference_model(args.checkpoint, state, dtype=DTYPES[args.dtype])
    tokenizer, layout, positions = loaded.tokenizer, loaded.layout, loaded.layout.max_text_positions
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams)
    backend = ModelBackend(loaded.model, layout, generation, args.batch_size)
    limit = slice(0, args.limit or None)
    if args.task == "tnews":
        words = load_label_words(args.label_words) if args.label_words else LABEL_WORDS
        return evaluate_tnews(backend, tokenizer, read_tnews(args.data, words)[limit], words,
                              positions, args.seeds)
    if args.task == "chid":
        return evaluate_chid(backend, tokenizer, read_chid(args.data)[limit], layout.mask_id, positions)
    return evaluate_cmrc(backend, tokenizer, read_cmrc(args.data)[limit], positions)


def main(argv=None) -> int:
    args = parse_args(argv)
    state = initialize(args.tp, 1)
    try:
        metrics, records = evaluate(args, state)
    except (DataFormatError, ConfigError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    if state.rank == 0:
        if args.out:
            write_predictions(args.out, records)
        print(json.dumps({"task": args.task, **metrics}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
