#!/usr/bin/env bash
# Rehearse the 10B M6-large on this CPU: its real layers (d 4096, 128 heads, FFN 16384, 16 + 512 =
# 528 positions), two blocks plus the full embedding, patch projection and head, trained for a few
# steps at tp = 2 on 2 ranks in fp32 with full activation recomputation; prints losses, step
# times and each rank's measured memory against the planner's prediction, then saves the sharded
# checkpoint and loads it back (m6_engine/plan/rehearse.py). About 5 GB of RAM per rank, minutes.
#   bash examples/rehearse_10b.sh [extra flags of m6_engine.plan.rehearse, e.g. --steps 5 --json out.json]
# DATA=DIR reuses a corpus of `python -m m6_engine.data.prepare_demo` (default: a fresh small one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=$(mktemp -d -t rehearse_10b.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
DATA=${DATA:-}
if [ -z "$DATA" ]; then
    DATA="$WORK/data"
    "$PYTHON" -m m6_engine.data.prepare_demo --out "$DATA" --num-images 50 --max-text-documents 300 \
        --max-shapes 1
fi
# One thread per rank: the two ranks share the cores (set OMP_NUM_THREADS to give each more).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m m6_engine.plan.rehearse --data "$DATA" --ckpt-dir "$WORK/ckpt" "$@"
