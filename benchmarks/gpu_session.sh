#!/usr/bin/env bash
# Everything a GPU session must do, in one device call (device time is short; see
# /work/.library/device/METHOD.md): build for this GPU, run the whole test suite (the CUDA
# cases run there), compute-sanitizer over the CUDA kernels (memcheck, and racecheck on the
# shared-memory sums), `python -m gfl_ops verify` and `python -m gfl_ops bench` on CUDA.
# Logs and the results JSON/PNG go to $OUT (default /tmp/gfl_ops_gpu); a summary is
# printed last. Run from the repository root:
#
#     bash benchmarks/gpu_session.sh                 # all of it
#     STEPS="build test" bash benchmarks/gpu_session.sh
#
# Then copy $OUT/<gpu>.json and .png to benchmarks/results/ and quote them in the README.
set -uo pipefail

OUT=${OUT:-/tmp/gfl_ops_gpu}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-"build test sanitize verify bench"}
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
  "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  note "$name: exit $status in $((SECONDS - started)) s; $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-200)"
  return $status
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
note "gpu: $(tail -n 1 "$OUT/gpu.txt")"

if wants build; then
  run_step build "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || { tail -n 40 "$OUT/build.log"; exit 1; }
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

if wants bench; then
  name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
  run_step bench "$PYTHON" -m gfl_ops bench --device cuda --json "$OUT/$name.json" --plot "$OUT/$name.png"
  sed -n '/^Headline targets/,$p' "$OUT/bench.log" | tee -a "$SUMMARY"
  # The other place for the gradient (functional.GRADIENT_PASS; CUDA's default is
  # "backward"): the same headline cases with the gradient written in the forward pass.
  GFL_OPS_GRADIENT_PASS=forward run_step bench_gradient_in_forward "$PYTHON" -m gfl_ops bench --device cuda \
    --ops qfl dfl --modes full --providers native --layouts nc --qfl-shapes 134400x80,537600x80 \
    --dfl-shapes 65536x17,262144x17 --json "$OUT/$name-gradient-in-forward.json"
  grep -E '^(qfl|dfl) ' "$OUT/bench_gradient_in_forward.log" | tee -a "$SUMMARY"
fi

echo
echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
