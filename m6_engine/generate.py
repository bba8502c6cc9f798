"""Generate text with a trained M6: ``python -m m6_engine.generate --checkpoint DIR [options]``.

    --image FILE      caption / answer about an image (patch features as in training)
    --prompt TEXT     the masked text (prefix), e.g. a question ending with its answer marker
    --beams 5         beam search (the paper's captioning setting); 1 with --sample samples

Neither --image nor --prompt: plain language modelling from [CLS]. Prints the generated text.
With tp > 1 launch under torchrun (``torchrun --nproc_per_node=2 -m m6_engine.generate --tp 2``);
rank 0 prints. A checkpoint saved with any (tp, pp) loads (pp = 1 here).
"""

import argparse
import dataclasses
import os
import sys

import torch.distributed as dist

from m6_engine.checkpoint import CheckpointError
from m6_engine.config import ConfigError
from m6_engine.data.model_inputs import check_extractor
from m6_engine.data.vision import EXTRACTORS, ExtractorConfig
from m6_engine.inference import GenerationConfig, generate, m6_prompt
from m6_engine.inference.loading import DTYPES, image_features, load_inference_model
from m6_engine.parallel import initialize


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or checkpoint directory")
    p.add_argument("--image", help="image file")
    p.add_argument("--prompt", default="", help="masked text (prefix)")
    p.add_argument("--extractor", choices=sorted(EXTRACTORS),
                   help="patch-feature extractor (default: the one the checkpoint records; a different one is refused)")
    p.add_argument("--resnet-weights", help="resnet50 extractor: torchvision state dict")
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (needs --beams 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and KV cache")
    p.add_argument("--vocab", help="vocab.txt (default: the one recorded in the checkpoint)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ConfigError naming the flag, the value and what is allowed, before any process group."""
    rules = [("--beams", args.beams, args.beams >= 1, ">= 1"),
             ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
             ("--temperature", args.temperature, args.temperature > 0, "> 0"),
             ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 disables)"),
             ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
             ("--no-repeat-ngram", args.no_repeat_ngram, args.no_repeat_ngram >= 0, ">= 0 (0 disables)"),
             ("--tp", args.tp, args.tp >= 1, ">= 1")]
    for flag, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{flag} must be {allowed}, got {value}")
    if args.sample and args.beams != 1:
        raise ConfigError(f"--sample needs --beams 1 (beam search is not sampled), got --beams {args.beams}")
    for flag, path, is_file in (("--checkpoint", args.checkpoint, False), ("--image", args.image, True),
                                ("--vocab", args.vocab, True), ("--resnet-weights", args.resnet_weights, True)):
        if path and not (os.path.isfile(path) if is_file else os.path.exists(path)):
            raise ConfigError(f"{flag} {path!r}: no such {'file' if is_file else 'checkpoint folder or directory'}")


def image_extractor(args: argparse.Namespace, recorded: dict | None, checkpoint) -> ExtractorConfig:
    """The extractor of ``--image``'s features: the checkpoint's, or ``--extractor`` when it gives
    the same features (or the checkpoint records none); anything else is a ConfigError."""
    if args.extractor is None and recorded is None:
        raise ConfigError(f"checkpoint {checkpoint} does not record the extractor its image features were made "
                          f"with: give --extractor ({' | '.join(sorted(EXTRACTORS))})")
    if args.extractor is None:
        fields = dict(recorded)
    else:
        fields = {**dataclasses.asdict(ExtractorConfig(name=args.extractor)), "weights": args.resnet_weights}
        check_extractor(fields, recorded, chosen_what=f"--extractor {args.extractor}",
                        recorded_what=f"checkpoint {checkpoint}")
    if args.resnet_weights:
        fields["weights"] = args.resnet_weights   # this machine's copy of the recorded weights
    fields.pop("device", None)                    # where the extractor runs is this process's choice
    known = {f.name for f in dataclasses.fields(ExtractorConfig)}
    return ExtractorConfig(**{k: v for k, v in fields.items() if k in known})


def run(args: argparse.Namespace, state) -> str:
    """The generated text of the prompt the arguments describe."""
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams,
                              do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, length_penalty=args.length_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram)
    loaded = load_inference_model(args.checkpoint, state, dtype=DTYPES[args.dtype], vocab_file=args.vocab)
    patches = None
    if args.image:
        patches = image_features(args.image, image_extractor(args, loaded.extractor, loaded.checkpoint))
    tokenizer, layout = loaded.tokenizer, loaded.layout
    prompt = m6_prompt(layout, tokenizer.encode(args.prompt), patches)
    (result,) = generate(loaded.model, [prompt], config, stop_id=layout.sep_id)
    return tokenizer.decode(result.tokens, skip_special_tokens=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except ConfigError as error:          # every rank meets it: RANK 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return 2
    state = initialize(args.tp, 1)
    try:
        text = run(args, state)
    except (ConfigError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    if state.rank == 0:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
