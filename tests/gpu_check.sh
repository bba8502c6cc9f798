#!/usr/bin/env bash
# `make gpu-check`: everything a GPU run proves, in one call (<= 9 minutes on one H100 / H200 from a
# fresh clone), on a machine that may be offline. It never installs anything: it takes the first
# python of $M6_PYTHON, .venv/bin/python, python3, python whose torch sees a GPU, and says which.
#   1. build m6_engine._C in place for this GPU's architecture only (MAX_JOBS = nproc)
#   2. the SASS check and the build checks (tests/test_sass.py, tests/test_build.py)
#   3. the CUDA tests (every `cuda`-marked test), then a subset under compute-sanitizer memcheck and
#      racecheck where compute-sanitizer is installed
#   4. the Python stages (tests/gpu_check.py): kernel benchmarks, a bf16 training run of
#      m6-base-width layers, GPU-vs-CPU losses, the fp16 loss scaler, GPU->CPU checkpoint, decoding,
#      ZeRO-Offload against AdamW on the device, attention, the per-shard initialisation
#   5. one JSON with every figure ($OUT/gpu_check.json, OUT=${GPU_CHECK_OUT:-bench-results}) and a
#      one-screen summary; the exit status is non-zero when any step failed.
# `--dry-run` checks this script's plumbing on the CPU (no GPU, no build: it uses the existing one,
# small sizes everywhere); `make test` runs it (tests/test_gpu_check.py) so the script cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash tests/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${GPU_CHECK_OUT:-bench-results}"
mkdir -p "$OUT"
STEPS="$OUT/gpu_check_steps.tsv"
: >"$STEPS"
export PYTHONUNBUFFERED=1

# step NAME CMD...: run CMD, record "NAME<TAB>exit status<TAB>seconds" for the summary.
step() {
  local name=$1 start=$SECONDS rc=0
  shift
  echo "== $name"
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STEPS"
  echo "-- $name: exit status $rc, $((SECONDS - start)) s"
  return "$rc"
}

# The interpreter: the first candidate whose torch imports and (unless --dry-run) sees a GPU.
PY=""
for candidate in "${M6_PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
  if "$candidate" -c "import sys, torch; sys.exit(0 if $DRY or torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=$(command -v "$candidate")
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu-check: FAILED: no python (M6_PYTHON, .venv/bin/python, python3, python) whose torch sees a GPU" >&2
  exit 1
fi
"$PY" -c "import sys, torch
print(f'python: {sys.executable} {sys.version.split()[0]}; torch {torch.__version__} '
      f'(CUDA {torch.version.cuda}); GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}')"

# 1. The build, for the architectures of this machine's GPUs only.
if [ "$DRY" = 1 ]; then
  step build "$PY" -c "import m6_engine.ops as o; o.require_extension(); print('dry run: using the existing build')"
else
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch
print(';'.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))")
  export TORCH_CUDA_ARCH_LIST M6_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"
  step build "$PY" setup.py --quiet build_ext --inplace
  # The in-place build now has this GPU's architecture only: the next `make` must rebuild the
  # default architectures (setup.py's TORCH_CUDA_ARCH_LIST) that tests/test_build.py expects.
  rm -f .stamps/ext
fi

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --timeout=600)
CUDA_TESTS=(tests/test_cuda_ops.py tests/test_masked_softmax.py tests/test_layer_norm.py tests/test_normal_shard.py)
if [ "$DRY" = 1 ]; then
  # The CPU suite runs these files already; here only check that the CUDA selection collects.
  step cuda_tests "${PYTEST[@]}" --collect-only -m cuda "${CUDA_TESTS[@]}"
else
  # 2. + 3. What the build and the kernels must satisfy, then every CUDA test.
  step sass_and_build "${PYTEST[@]}" tests/test_sass.py tests/test_build.py
  step cuda_tests "${PYTEST[@]}" -m cuda "${CUDA_TESTS[@]}"
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$SANITIZER" ]; then
    SUBSET=(-m cuda -k "path_edges or every_element or misaligned or decode" tests/test_cuda_ops.py)
    step memcheck timeout 240 "$SANITIZER" --tool memcheck --error-exitcode 3 "${PYTEST[@]}" -x "${SUBSET[@]}"
    step racecheck timeout 240 "$SANITIZER" --tool racecheck --error-exitcode 3 "${PYTEST[@]}" -x "${SUBSET[@]}"
  else
    echo "compute-sanitizer not installed: memcheck and racecheck not run"
  fi
fi

# 4. The engine on the device.
if [ "$DRY" = 1 ]; then
  step stages "$PY" -m tests.gpu_check --dry-run --out "$OUT"
else
  step stages "$PY" -m tests.gpu_check --device cuda --out "$OUT"
fi

# 5. One JSON, one screen, one exit status.
"$PY" -m tests.gpu_check --summarize "$OUT"
