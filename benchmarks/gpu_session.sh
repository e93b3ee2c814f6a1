#!/usr/bin/env bash
# A GPU session's work (device time is short; see /work/.library/device/METHOD.md): build
# for this GPU, run the whole test suite (the CUDA cases run there), compute-sanitizer over
# the CUDA kernels (memcheck, and racecheck on the shared-memory sums), `python -m gfl_ops
# verify` and the benchmark's headline cases on CUDA. Logs and results JSON/PNG go to $OUT
# (default /tmp/gfl_ops_gpu); a summary is printed last. From the repository root, in two
# device calls of under 10 minutes each (the build is incremental while build/ is kept):
#
#     STEPS="build test sanitize" bash benchmarks/gpu_session.sh
#     STEPS="build verify bench" bash benchmarks/gpu_session.sh
#     STEPS="build bench_all" BENCH_ARGS="--ops qfl" bash benchmarks/gpu_session.sh   # the default set, in parts
#
# Then copy $OUT/<gpu>.json and .png to benchmarks/results/, quote them in the README and
# add the run to benchmarks/README.md's Runs (`python -m gfl_ops bench --from-json
# benchmarks/results/<gpu>.json` prints its table and targets again, on any machine).
set -uo pipefail

OUT=${OUT:-/tmp/gfl_ops_gpu}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-"build test sanitize verify bench"}
STEP_TIMEOUT=${STEP_TIMEOUT:-480}  # seconds per step: a hung step must not eat the lease
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

# Runs "$@" with its output in $OUT/$name.log; notes the exit status and the log's last line.
run_step() {
  local name=$1
  shift
  local started=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  note "$name: exit $status in $((SECONDS - started)) s; $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-200)"
  return $status
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
note "gpu: $(tail -n 1 "$OUT/gpu.txt")"

if wants build; then
  # In place (gfl_ops/_C*.so): the repository root is on sys.path for pytest and -m gfl_ops.
  run_step build "$PYTHON" setup.py build_ext --inplace || { tail -n 40 "$OUT/build.log"; exit 1; }
  # The compiler's resource report: registers, shared memory, spills per kernel.
  cuobjdump --dump-resource-usage gfl_ops/_C*.so > "$OUT/resource_usage.txt" 2>&1
fi

if wants test; then
  run_step test "$PYTHON" -m pytest -q -rs tests
fi

if wants sanitize; then
  # memcheck: every CUDA case of the parity, bad-input and reduction tests; racecheck on the
  # kernels with shared-memory block sums (reduction "sum").
  run_step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -x -k cuda tests/test_parity_qfl.py tests/test_parity_dfl.py tests/test_errors.py
  run_step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$PYTHON" - <<'EOF'
import torch
import gfl_ops

pred = torch.randn(5000, 80, device="cuda", requires_grad=True)
label = torch.randint(0, 90, (5000,), device="cuda")
gfl_ops.quality_focal_loss(pred, label, torch.rand(5000, device="cuda"), backend="native").backward()
bins = torch.randn(20000, 17, device="cuda", requires_grad=True)
gfl_ops.distribution_focal_loss(bins, torch.rand(20000, device="cuda") * 16, backend="native").backward()
torch.cuda.synchronize()
print("racecheck workload done")
EOF
fi

if wants verify; then
  run_step verify "$PYTHON" -m gfl_ops verify --device cuda
fi

name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null)
if wants bench; then
  # The CUDA issue's headline cases: every provider (torch.compile compiles each shape once).
  run_step bench "$PYTHON" -m gfl_ops bench --device cuda --ops qfl dfl --modes full \
    --qfl-shapes 134400x80,537600x80 --dfl-shapes 65536x17,262144x17 --json "$OUT/$name.json" --plot "$OUT/$name.png"
  sed -n '/^Headline targets/,$p' "$OUT/bench.log" | tee -a "$SUMMARY"
  # The other place for the gradient (the gradient pass, csrc/gfl_ops.cpp; CUDA's default is
  # "backward"): the same headline cases with the gradient written in the forward pass.
  GFL_OPS_GRADIENT_PASS=forward run_step bench_gradient_in_forward "$PYTHON" -m gfl_ops bench --device cuda \
    --ops qfl dfl --modes full --providers native --layouts nc --qfl-shapes 134400x80,537600x80 \
    --dfl-shapes 65536x17,262144x17 --json "$OUT/$name-gradient-in-forward.json"
  grep -E '^(qfl|dfl) ' "$OUT/bench_gradient_in_forward.log" | tee -a "$SUMMARY"
fi

if wants bench_all; then
  # BENCH_ARGS splits it over calls, e.g. BENCH_ARGS="--ops qfl qfl_prob", then "--ops qfl_dense dfl integral".
  # shellcheck disable=SC2086
  run_step bench_all "$PYTHON" -m gfl_ops bench --device cuda ${BENCH_ARGS:-} --json "$OUT/$name-all.json" \
    --plot "$OUT/$name-all.png"
  sed -n '/^Headline targets/,$p' "$OUT/bench_all.log" | tee -a "$SUMMARY"
fi

echo
echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
