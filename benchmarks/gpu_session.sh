#!/usr/bin/env bash
# The whole GPU check in one command of under 9 minutes (budgeted for an H200 machine with
# 16 cores, torch 2.11, CUDA 13.0, Python 3.12), from the repository root:
#
#     bash benchmarks/gpu_session.sh            # results and logs in $OUT (default /tmp/gfl_ops_gpu)
#
# Steps, in order of what a short lease must not miss:
#   build      gfl_ops._C in place for this GPU (sm_90; the kernels' six units in parallel),
#              the CUDA machine-code table of that build (cuda.json), and the Triton one
#              compiled by this machine's own Triton (triton.json, which names its version)
#   test       the suite's CUDA cases (pytest -k cuda: parity, errors, reductions, compile)
#   sanitize   compute-sanitizer memcheck, then racecheck, over benchmarks/gpu_workload.py
#              (every operator, layout and dtype, native and Triton, forward and backward)
#   sync       the same workload with torch.cuda.set_sync_debug_mode("error"): no host sync
#   verify     python -m gfl_ops verify --device cuda (gradcheck, low-precision parity)
#   bench      the headline cases with every provider (native, triton, reference,
#              torch.compile, the eager peers), then the native provider with the gradient in
#              the forward pass; results JSON/PNG in $OUT
# Every step runs under what is left of BUDGET seconds (default 500: the device call's
# start and the copy of $OUT back fit in the rest); a step that would have less than
# MIN_STEP seconds is skipped and said so. The summary ($OUT/summary.txt) is printed last.
#
# Without a GPU, DEVICE=cpu runs the same plumbing on the CPU (no sanitizer, no sync mode,
# small benchmark shapes): `DEVICE=cpu STEPS="test verify bench" bash benchmarks/gpu_session.sh`.
#
# Then copy $OUT/<gpu>*.json and .png to benchmarks/results/, $OUT/cuda.json and
# $OUT/triton.json to benchmarks/results/machine-code/, quote them in the README, add the run to
# benchmarks/README.md's Runs, and derive the auto backend's table:
# `python -m gfl_ops tune $OUT/<gpu>.json --gradient-in-forward $OUT/<gpu>-gradient-in-forward.json`.
set -uo pipefail

OUT=${OUT:-/tmp/gfl_ops_gpu}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-"build test sanitize sync verify bench"}
BUDGET=${BUDGET:-500}
MIN_STEP=${MIN_STEP:-20}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME CAP COMMAND...: the command, its output in $OUT/NAME.log, under at most CAP
# seconds and what is left of the budget; notes its exit status and its log's last line.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < MIN_STEP)); then
    note "$name: skipped, ${left} s of the budget left"
    return 124
  fi
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  note "$name: exit $status in $((SECONDS - started)) s (limit $limit s); $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-200)"
  return $status
}

if [[ $DEVICE == cuda ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
  note "gpu: $(tail -n 1 "$OUT/gpu.txt")"
  name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null)
  QFL_SHAPES=${QFL_SHAPES:-134400x80,537600x80}
  DFL_SHAPES=${DFL_SHAPES:-65536x17,262144x17}
else
  name=cpu-plumbing
  QFL_SHAPES=${QFL_SHAPES:-2048x80}
  DFL_SHAPES=${DFL_SHAPES:-4096x17}
fi

if wants build; then
  # In place (gfl_ops/_C*.so): the repository root is on sys.path for pytest and -m gfl_ops.
  MAX_JOBS=${MAX_JOBS:-$(nproc)} run_step build 300 "$PYTHON" setup.py build_ext --inplace \
    || { tail -n 40 "$OUT/build.log"; exit 1; }
  run_step machine_code 60 "$PYTHON" -m tools.cuda_machine_code --json "$OUT/cuda.json"
  run_step triton_machine_code 60 "$PYTHON" -m tools.triton_machine_code --json "$OUT/triton.json"
fi

if wants test; then
  # Not the emulator's tests (their build takes minutes, and a GPU runs the real kernels) nor
  # the machine-code ones (CI runs them on the same sm_90 build; the step above wrote the table).
  run_step test 150 "$PYTHON" -m pytest -q -rs -x -p no:cacheprovider -k cuda tests \
    -m "not emulated and not machine_code"
fi

if wants sanitize && [[ $DEVICE == cuda ]]; then
  run_step memcheck 100 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PYTHON" benchmarks/gpu_workload.py
  # racecheck: the shared-memory block sums of reduction "sum" (one backend is enough)
  run_step racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PYTHON" benchmarks/gpu_workload.py --backends native
fi

if wants sync && [[ $DEVICE == cuda ]]; then
  run_step sync 60 "$PYTHON" benchmarks/gpu_workload.py --sync-debug
fi

if wants verify; then
  run_step verify 60 "$PYTHON" -m gfl_ops verify --device "$DEVICE"
fi

if wants bench; then
  # Every provider; torch.compile compiles each shape once.
  run_step bench 150 "$PYTHON" -m gfl_ops bench --device "$DEVICE" --ops qfl dfl --modes full \
    --qfl-shapes "$QFL_SHAPES" --dfl-shapes "$DFL_SHAPES" --json "$OUT/$name.json" --plot "$OUT/$name.png"
  sed -n '/^Headline targets/,$p' "$OUT/bench.log" | tee -a "$SUMMARY"
  # The other place for the gradient (csrc/gfl_ops.cpp's gradient pass; CUDA's default is
  # "backward"): the native provider with the gradient written in the forward pass.
  GFL_OPS_GRADIENT_PASS=forward run_step bench_gradient_in_forward 60 "$PYTHON" -m gfl_ops bench \
    --device "$DEVICE" --ops qfl dfl --modes full --providers native --layouts nc --qfl-shapes "$QFL_SHAPES" \
    --dfl-shapes "$DFL_SHAPES" --json "$OUT/$name-gradient-in-forward.json"
  grep -E '^(qfl|dfl) ' "$OUT/bench_gradient_in_forward.log" | tee -a "$SUMMARY"
fi

note "total: $SECONDS s of a $BUDGET s budget"
