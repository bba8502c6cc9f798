#!/usr/bin/env bash
# The 10B M6-large planned for the paper's cluster (96 V100-32G) and for 8 nodes x 8 H200:
# per-rank memory, step estimate and the layouts that fit, then every rank of the chosen layout
# built on the meta device with its parameters counted (no GPU needed; about a minute on a CPU).
#   bash examples/plan_10b.sh [extra planner flags, e.g. --inter-node-gbps 800]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
for preset in paper-96xV100 h200-8x8; do
    echo "=================================================================== $preset"
    "$PYTHON" -m m6_engine.plan --preset "$preset" --meta "$@"
    echo
done
