#!/usr/bin/env bash
# Launch M6-large (10B) pretraining on one node of a multi-node job; run it on every node (or let
# examples/pretrain_m6_large.sbatch do that under SLURM).
#   CLUSTER=8xH200  (default; 8 nodes x 8 H200, bf16, tp 1 x pp 2 (V 4) x dp 32) or
#   CLUSTER=96xV100 (the paper's: 12 nodes x 8 V100-32G, fp16, tp 4 x pp 2 x dp 12); unset, it is
#                   taken from the GPU nvidia-smi names (a V100 picks 96xV100, anything else 8xH200)
#   TASKS=multimodal (default: 8000 steps of image-to-text and multimodality-to-text) or text
#                   (4500 text-only steps), as the paper pretrained M6-large
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun; DATA=prefix of the preprocessed
#   corpus; EVAL_DATA=held-out prefix (optional); SAVE=checkpoint folder (resumed from
#   automatically); extra flags go to pretrain_m6.py. PRINT_ONLY=1 prints the command instead.
# Before the rendezvous it checks that torch has kernels for the GPUs (m6_engine.gpu_support: a
# V100 needs torch's CUDA 12.6 build and the extension built with TORCH_CUDA_ARCH_LIST=7.0, README).
# Layouts and memory per rank: examples/configs/m6-large-*.yaml (the planner's table).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${CLUSTER:-}" ]; then
    CLUSTER=8xH200
    if command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q V100; then
        CLUSTER=96xV100
    fi
fi
case "$CLUSTER" in
    96xV100) DEFAULT_NNODES=12 ;;
    8xH200) DEFAULT_NNODES=8 ;;
    *) echo "CLUSTER must be 8xH200 or 96xV100, got '$CLUSTER'" >&2; exit 2 ;;
esac
case "${TASKS:-multimodal}" in
    multimodal) CONFIG="examples/configs/m6-large-$CLUSTER.yaml" ;;
    text) CONFIG="examples/configs/m6-large-text-$CLUSTER.yaml" ;;
    *) echo "TASKS must be multimodal or text, got '$TASKS'" >&2; exit 2 ;;
esac
: "${DATA:?set DATA to the corpus prefix written by python -m m6_engine.data.preprocess}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
RUN="m6-large-${TASKS:-multimodal}-$CLUSTER"
EVAL=()
[ -n "${EVAL_DATA:-}" ] && EVAL=(--eval-data "$EVAL_DATA")
COMMAND=(torchrun --nnodes="${NNODES:-$DEFAULT_NNODES}" --nproc_per_node=8 --node_rank="${NODE_RANK:-0}"
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --max-restarts=3
    examples/pretrain_m6.py --config "$CONFIG" --data "$DATA" "${EVAL[@]}"
    --save "${SAVE:-checkpoints/$RUN}" --load auto --tensorboard-dir "${TENSORBOARD:-runs/$RUN}" "$@")
if [ -n "${PRINT_ONLY:-}" ]; then
    printf '%q ' "${COMMAND[@]}"; echo
    exit 0
fi
"$PYTHON" -m m6_engine.gpu_support
# Restarts re-rendezvous on a fresh store (pytorch/pytorch#135712), see README.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "${COMMAND[@]}"
