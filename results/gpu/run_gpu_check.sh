#!/usr/bin/env bash
# The GPU check, one command for the lent machine (Python 3.12 + torch 2.11, no Ray, no network).
#   device:  bash results/gpu/run_gpu_check.sh        with .bundle/cp312 carried (results/gpu/README.md)
#   dry run: ZCBENCH_GPU_DRY_RUN=1 results/gpu/run_gpu_check.sh   (here: builds .bundle/cp311, CUDA parts skipped)
# Steps, each with its own time budget and log under $OUT:
#   install     the carried wheels into a clean --target folder; zcbench importable through a shim (no pip install
#               of the project: pyproject pins Python <3.12 and torch 2.13)
#   tests       the reference's GPU tests        (reference/tests/test_gpu_logic.py)
#   conformance the suite's gpu.* checks against the reference (harness conformance CLI)
#   controls    the negative controls of the gpu checks (reported "missing" while that module does not exist)
#   benchmark   harness/gpu_check.py: VRAM per process at pool 4, load times, exactness, write policy, owner death, release
# Then summary.json and the lines for the commit note. Exit 0 only when every step passed. Whole run <= 8 minutes.
set -u
cd "$(dirname "$0")/../.."
REPO=$PWD
DRY=${ZCBENCH_GPU_DRY_RUN:-0}
[ "$DRY" = 1 ] || DRY=0

# Per-step budgets in seconds (device figures; harness/tests/test_device_bundle.py checks they fit 8 minutes).
BUDGET_INSTALL=40
BUDGET_TESTS=120
BUDGET_CONFORMANCE=110
BUDGET_CONTROLS=60
BUDGET_BENCHMARK=135
TOTAL_S=480   # the whole run; 15 s of it are kept for machine facts and the summary
RESERVE_S=15
# The dry run's machine is slower (2 shared cores): its budgets are scaled, the device's never are.
SCALE=${ZCBENCH_BUDGET_SCALE:-$([ "$DRY" = 1 ] && echo 3 || echo 1)}

OUT_DIR=${OUT:-results/gpu/out}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
# Only the planned files come back (at most 8, 2 folders deep); stale ones from an earlier local run go first.
rm -rf "$OUT_DIR/conformance"
rm -f "$OUT_DIR"/{summary.json,tests.txt,conformance.txt,controls.txt,gpu_check.txt,gpu_check.json,gpu_check.md}
WORK=$(mktemp -d /tmp/zcbench-gpu.XXXXXX)   # outside $OUT: JUnit files, step records, shim, dry-run site
[ "${ZCBENCH_KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.tsv
: >"$STEPS"

export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ZCBENCH_PROFILE=${ZCBENCH_PROFILE:-zcbench-ci}
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  SITE=$WORK/site
else
  PY=${PYTHON:-python3}
  SITE=${ZCBENCH_SITE:-/tmp/site}
fi
PY=$(command -v "$PY")
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
BUNDLE=${ZCBENCH_BUNDLE:-.bundle/cp${PYVER/./}}
SHIM=$WORK/shim

banner() { echo; echo "=== $(date +%T) [${SECONDS}s] $*"; }
# record NAME RC SECONDS BUDGET NOTE: one line per step for the summary
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$STEPS"; }
DEADLINE=$((SECONDS + TOTAL_S * SCALE))
# run_step NAME BUDGET LOG CMD...: the command under its budget (cut to what is left), output to LOG and the console
run_step() {
  local name=$1 budget=$(($2 * SCALE)) log=$3; shift 3
  local left=$((DEADLINE - SECONDS - RESERVE_S))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 5 ]; then
    banner "$name: no time left"; echo "not run: the run's time is spent" >"$log"; record "$name" 124 0 0 "no time left"; return
  fi
  banner "$name (budget ${budget} s): $*"
  local t0=$SECONDS
  # timeout runs the command in its own process group and kills all of it (Ray's processes too) at the limit.
  timeout -k 10 "$budget" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "--- $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  record "$name" "$rc" $((SECONDS - t0)) "$budget"
}

{  # machine facts first, on the console and at the top of tests.txt
banner "machine ($([ "$DRY" = 1 ] && echo "CPU DRY RUN" || echo device))"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv
else
  echo "nvidia-smi: not available"
fi
"$PY" - <<'EOF'
import os, sys
print(f"python {sys.version.split()[0]} at {sys.executable}")
try:
    import torch
    print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} devices={torch.cuda.device_count()}")
except Exception as exc:
    print(f"torch: {exc!r}")
print(f"cpus {os.cpu_count()}")
EOF
echo "bundle $BUNDLE, install target $SITE, out $OUT_DIR, budgets x$SCALE"
} 2>&1 | tee "$OUT_DIR/tests.txt"

if [ "$DRY" = 1 ]; then
  banner "bundle for the local Python $PYVER (dry run only; the device gets .bundle/cp312 built here)"
  "$PY" harness/device_bundle.py build --python "$PYVER" --dest "$BUNDLE" || { echo "bundle build failed"; exit 1; }
  DEADLINE=$((SECONDS + TOTAL_S * SCALE))   # the device's clock starts after the bundle, which is built here
fi

install_bundle() {
  set -e
  ls -l "$BUNDLE"/*.whl
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/*.whl
  "$PY" harness/device_run.py shim --dest "$SHIM"
  if [ "$DRY" = 1 ]; then  # hide what Ray's extras bring here but the device lacks, so Ray runs as it will there
    "$PY" harness/device_run.py device-like --dest "$WORK/devlike" --site "$SITE"
  fi
  PYTHONPATH=$PYPATH "$PY" - "$SITE" "$SHIM" <<'EOF'
import sys
site, shim = sys.argv[1:3]
import os
import ray, zcbench, zcbench.harness, zcbench.reference, zcbench.suites
print(f"ray {ray.__version__} from {ray.__file__}")
print(f"zcbench from {zcbench.__file__}; zcbench.harness from {zcbench.harness.__file__}")
assert ray.__file__.startswith(site), f"ray was imported from {ray.__file__}, not from the bundle's target {site}"
assert zcbench.__file__.startswith(shim), f"zcbench was not imported through the shim: {zcbench.__file__}"
assert zcbench.harness.__file__ == os.path.abspath("harness/__init__.py"), "zcbench.harness is not this checkout's"
try:  # what Ray will schedule num_gpus= actors on (no cluster started for this)
    from ray._private.accelerators import get_accelerator_manager_for_resource
    print("GPUs Ray detects:", get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
except Exception as exc:
    print(f"GPUs Ray detects: unknown ({exc!r})")
EOF
  PYTHONPATH=$PYPATH "$PY" harness/device_run.py deps --site "$SITE" || echo "(warning only: versions the device has may still work)"
}
PYPATH="$SITE:$SHIM"
[ "$DRY" = 1 ] && PYPATH="$WORK/devlike:$PYPATH"
export -f install_bundle
export PY SITE SHIM BUNDLE DRY WORK PYPATH
run_step install "$BUDGET_INSTALL" "$OUT_DIR/tests.txt" bash -c install_bundle
export PYTHONPATH=$PYPATH
if [ "$(tail -1 "$STEPS" | cut -f2)" != 0 ]; then  # nothing below can import: keep the device's minutes
  echo "install failed: was .bundle/cp$(echo "$PYVER" | tr -d .) carried (carry=[\"$BUNDLE\"])? Skipping the other steps."
  for s in tests conformance controls benchmark; do record "$s" 1 0 0 "not run: install failed"; done
  "$PY" harness/device_run.py summarize --out "$OUT_DIR" --steps "$STEPS" --log-dir "$WORK" $([ "$DRY" = 1 ] && echo --dry-run)
  exit 1
fi

run_step tests "$BUDGET_TESTS" "$OUT_DIR/tests.txt" \
  "$PY" -m pytest reference/tests/test_gpu_logic.py -q -p no:cacheprovider -rA --junitxml="$WORK/tests.xml"

run_step conformance "$BUDGET_CONFORMANCE" "$OUT_DIR/conformance.txt" \
  "$PY" -m zcbench.harness.cli conformance --impl reference --select gpu. --out "$OUT_DIR/conformance" \
  --timeout $((BUDGET_CONFORMANCE * SCALE - 15))
if [ -f "$OUT_DIR/conformance/matrix.md" ]; then  # its table goes into the log: only 8 files come back
  { echo; cat "$OUT_DIR/conformance/matrix.md"; } | tee -a "$OUT_DIR/conformance.txt"
fi

CONTROLS=(-m pytest --pyargs zcbench.suites.tests.test_controls -k gpu -q -p no:cacheprovider -rA --junitxml="$WORK/controls.xml")
if [ -f suites/tests/test_controls.py ]; then
  run_step controls "$BUDGET_CONTROLS" "$OUT_DIR/controls.txt" "$PY" "${CONTROLS[@]}"
else
  banner "controls: missing (suites/tests/test_controls.py does not exist yet)"
  echo "missing: suites/tests/test_controls.py does not exist; command kept: python3 ${CONTROLS[*]}" | tee "$OUT_DIR/controls.txt"
  record controls 0 0 $((BUDGET_CONTROLS * SCALE)) missing
fi

BENCH=(-m zcbench.harness.gpu_check --out "$OUT_DIR" --budget-s $((BUDGET_BENCHMARK * SCALE - 25)))
[ "$DRY" = 1 ] && BENCH+=(--device cpu)   # the same scenarios on the CPU: GPU readings n/a
run_step benchmark "$BUDGET_BENCHMARK" "$OUT_DIR/gpu_check.txt" "$PY" "${BENCH[@]}"

banner "left on the GPU (should be nothing)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid,used_memory --format=csv || echo "n/a"

banner "summary"
"$PY" harness/device_run.py summarize --out "$OUT_DIR" --steps "$STEPS" --log-dir "$WORK" $([ "$DRY" = 1 ] && echo --dry-run)
rc=$?
echo "total ${SECONDS} s; files in $OUT_DIR:"
(cd "$OUT_DIR" && find . -type f | sort)
exit $rc
