#!/usr/bin/env bash
# Launch M6-large (10B) pretraining on one node of a multi-node job; run it on every node.
#   CLUSTER=96xV100 (paper: 12 nodes x 8 V100-32G, fp16, tp 4 x pp 2 x dp 12) or
#   CLUSTER=8xH200  (8 nodes x 8 H200, bf16, tp 2 x dp 32)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun; DATA=prefix of the preprocessed
#   corpus; SAVE=checkpoint folder (resumed from automatically); extra flags go to pretrain_m6.py.
# Layouts and memory per rank: examples/configs/m6-large-$CLUSTER.yaml (the planner's table).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-96xV100}
case "$CLUSTER" in
    96xV100) DEFAULT_NNODES=12 ;;
    8xH200) DEFAULT_NNODES=8 ;;
    *) echo "CLUSTER must be 96xV100 or 8xH200, got '$CLUSTER'" >&2; exit 2 ;;
esac
: "${DATA:?set DATA to the corpus prefix written by python -m m6_engine.data.preprocess}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
# Restarts re-rendezvous on a fresh store (pytorch/pytorch#135712), see README.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="${NNODES:-$DEFAULT_NNODES}" --nproc_per_node=8 --node_rank="${NODE_RANK:-0}" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --max-restarts=3 \
    examples/pretrain_m6.py --config "examples/configs/m6-large-$CLUSTER.yaml" \
    --data "$DATA" --save "${SAVE:-checkpoints/m6-large-$CLUSTER}" --load auto \
    --tensorboard-dir "${TENSORBOARD:-runs/m6-large-$CLUSTER}" "$@"
