#!/usr/bin/env bash
# One prepared GPU check for a lent machine (run from the repository root; total < 8 minutes).
#   1. a Python 3.11 environment with zcbench and a CUDA build of torch 2.13.0
#   2. the reference's GPU tests (reference/tests/test_gpu_logic.py -k gpu)
#   3. the suite's gpu.* checks against the reference (tolerated if the plugin is not there)
#   4. a short CUDA benchmark: device memory per actor (pool of 4), load time, exact outputs
# Everything lands in $OUT (or results/gpu/out); BUDGET_S (450) caps the whole run; the exit status is that of step 2.
set -u
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-results/gpu/out}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/run.log") 2>&1
export RAY_AUTH_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1
step() { echo; echo "=== $(date +%T) [${SECONDS}s] $*"; }
# One budget for the whole script: each step gets at most its own limit and what is left.
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))
limit() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }

step "machine"
nvidia-smi -L || echo "nvidia-smi: not found"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true

step "environment"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="${VENV:-/tmp/zcbench-gpu-venv}"  # outside the tree: never carried back or committed
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') and torch.cuda.is_available() else 1)" 2>/dev/null; then
  timeout "$(limit 150)" pip install -q "torch==2.13.0" || echo "pip install torch==2.13.0 failed"
fi
timeout "$(limit 90)" pip install -q -e '.[compare,report]' || echo "pip install -e '.[compare,report]' failed"
python - <<'EOF'
import sys
import torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} devices={torch.cuda.device_count()}")
if not torch.cuda.is_available():
    print("NO CUDA: this torch build or machine cannot run the GPU checks (need a CUDA build of torch 2.13.0 "
          "and a visible NVIDIA GPU); stopping before the tests.")
    sys.exit(3)
EOF
[ $? -eq 0 ] || exit 3

step "reference GPU tests"
timeout "$(limit 180)" python -m pytest reference/tests/test_gpu_logic.py -p no:zcbench -q -rA -k gpu \
  --junitxml="$OUT_DIR/reference_gpu_tests.xml"
TESTS_RC=$?
echo "reference GPU tests: exit $TESTS_RC"

step "suite gpu checks (reference)"
timeout "$(limit 100)" python -m pytest --pyargs zcbench.suites --zc-impl reference -k gpu -q -rA \
  --junitxml="$OUT_DIR/suite_gpu_checks.xml"
echo "suite gpu checks: exit $? (0 ok, 1 failures, 4/5 usage/no tests: the plugin may not be there yet)"

step "cuda benchmark"
timeout "$(limit 100)" python -m zcbench.harness.gpu_check --out "$OUT_DIR" --mib 512 --actors 4
echo "cuda benchmark: exit $?"

step "leftover owners (should be none)"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true
exit $TESTS_RC
