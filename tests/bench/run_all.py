"""`make bench`: run every benchmark of tests/bench/ in one process, print their tables, write JSON.

Benchmarks print figures, they do not pass or fail. Each module here has ``run(out_dir, ...)``
returning a dict and writing ``<out_dir>/<name>.json``; this runner adds a summary file.
"""

import argparse
import importlib
import json
import os
import time

# (module, keyword arguments of its run()) in the order they run: cheap first.
BENCHMARKS = (
    ("tests.bench.bench_ops", {"device": "cpu"}),
    ("tests.bench.bench_attention", {}),
    ("tests.bench.bench_tokenizer", {}),
    ("tests.bench.bench_preprocess", {}),
    ("tests.bench.bench_sample_index", {}),
    ("tests.bench.bench_pipeline", {}),
    ("tests.bench.bench_interleaved", {}),
    ("tests.bench.bench_optim", {"device": "cpu"}),
    ("tests.bench.bench_cpu_adamw", {}),
    ("tests.bench.bench_zero", {}),
    ("tests.bench.bench_startup", {}),
    ("tests.bench.bench_sequence_parallel", {}),
    ("tests.bench.bench_plan_vs_measured", {}),
    ("tests.bench.bench_decode", {}),
    ("tests.bench.bench_training", {}),
    ("tests.bench.bench_megatron_race", {}),
    ("tests.bench.bench_async_checkpoint", {}),
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    parser.add_argument("--only", nargs="*", default=None, help="module names (e.g. bench_ops) to run")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for module_name, kwargs in BENCHMARKS:
        short = module_name.rsplit(".", 1)[-1]
        if args.only and short not in args.only:
            continue
        print(f"\n=== {short} ===", flush=True)
        start = time.perf_counter()
        result = importlib.import_module(module_name).run(out_dir=args.out, **kwargs)
        summary[short] = {"seconds": round(time.perf_counter() - start, 1), "result": result}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"\nwrote {os.path.join(args.out, 'summary.json')}")


if __name__ == "__main__":
    main()
