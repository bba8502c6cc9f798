"""`make demo`: data -> 4-rank pretraining (tp=2, pp=2, CPU) -> captions and answers on held-out images.

    python examples/demo.py --out runs/demo [--steps 600] [--images 2000] [--max-shapes 1]

1. the synthetic shapes set + People's Daily text, cleaned and preprocessed by the real pipeline
   (``m6_engine.data.prepare_demo``), reused when already there with the same settings;
2. ``torchrun --nproc_per_node=4 examples/pretrain_m6.py --config examples/configs/tiny.yaml``
   (all four tasks, tp=2, pp=2): a log line every 10 steps, TensorBoard events in OUT/tensorboard,
   a checkpoint in OUT/checkpoints;
3. the checkpoint is loaded at tp=1, pp=1 (resharded) and greedily captions the held-out images and
   answers the held-out questions; a few are printed next to the truth, then the accuracies
   (a caption is right when colour, shape and position are all right: the whole text matches).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="data, checkpoints and TensorBoard logs go here")
    p.add_argument("--steps", type=int, default=int(os.environ.get("DEMO_STEPS", 600)))
    p.add_argument("--images", type=int, default=int(os.environ.get("DEMO_IMAGES", 2000)))
    p.add_argument("--max-shapes", type=int, default=int(os.environ.get("DEMO_MAX_SHAPES", 1)))
    p.add_argument("--extractor", default=os.environ.get("DEMO_EXTRACTOR", "pixels_edges"),
                   help="patch features: pixels_edges | pixels")
    p.add_argument("--text-documents", type=int, default=int(os.environ.get("DEMO_TEXT_DOCS", 4000)))
    p.add_argument("--eval-limit", type=int, default=int(os.environ.get("DEMO_EVAL_LIMIT", 100)),
                   help="held-out captions (and questions) to decode")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--set", action="append", default=[], help="passed to pretrain_m6.py")
    return p.parse_args(argv)


def prepare_data(args, data: Path) -> dict:
    wanted = {"num_images": args.images, "max_shapes": args.max_shapes,
              "max_text_documents": args.text_documents, "extractor": args.extractor}
    manifest_path = data / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if all(manifest["config"].get(k) == v for k, v in wanted.items()):
            print(f"[demo] data: reusing {data}", flush=True)
            return manifest
    print(f"[demo] data: synthetic shapes ({args.images} images) + People's Daily -> {data}", flush=True)
    subprocess.run([sys.executable, "-m", "m6_engine.data.prepare_demo", "--out", str(data),
                    "--num-images", str(args.images), "--max-shapes", str(args.max_shapes),
                    "--max-text-documents", str(args.text_documents), "--extractor", args.extractor], check=True)
    return json.loads(manifest_path.read_text(encoding="utf-8"))


def pretrain(args, corpora: dict, out: Path) -> None:
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)   # a fresh run each time
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(REPO / "examples" / "pretrain_m6.py"), "--config", str(REPO / "examples/configs/tiny.yaml"),
               "--data", corpora["train"], "--eval-data", corpora["heldout"],
               "--train-steps", str(args.steps), "--save", str(checkpoints),
               "--tensorboard-dir", str(out / "tensorboard")]
    for item in args.set:
        command += ["--set", item]
    print(f"[demo] pretraining: {' '.join(command[2:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    subprocess.run(command, check=True, env=env)


def evaluate(args, corpora: dict, out: Path) -> dict:
    import torch

    from m6_engine.evaluate.captions import evaluate_held_out
    from m6_engine.inference.loading import load_inference_model
    from m6_engine.parallel import initialize

    torch.set_num_threads(2)
    state = initialize(1, 1)
    loaded = load_inference_model(out / "checkpoints", state)
    print(f"[demo] evaluating {loaded.checkpoint} (step {loaded.step}) on held-out images", flush=True)
    result = evaluate_held_out(loaded.model, loaded.layout, loaded.tokenizer, corpora["heldout"],
                               limit=args.eval_limit)
    for kind in ("caption", "question"):
        for p in [p for p in result.predictions if p.kind == kind][:4]:
            mark = "ok " if p.correct else "BAD"
            print(f"  {mark} {p.prompt}\n      model: {p.predicted}\n      truth: {p.reference}")
    summary = {kind: {"accuracy": result.accuracy(kind), "count": result.count(kind)}
               for kind in ("caption", "question")}
    print(f"[demo] caption accuracy {100 * summary['caption']['accuracy']:.1f}% of "
          f"{summary['caption']['count']} held-out images (colour, shape and position all right); "
          f"question accuracy {100 * summary['question']['accuracy']:.1f}% of {summary['question']['count']}")
    tmp = out / "demo_result.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tmp.replace(out / "demo_result.json")
    return summary


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    manifest = prepare_data(args, out / "data")
    pretrain(args, manifest["corpora"], out)
    evaluate(args, manifest["corpora"], out)


if __name__ == "__main__":
    main()
