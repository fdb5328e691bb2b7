#!/usr/bin/env bash
# One call on a fresh GPU machine: build in place, GPU tests, compute-sanitizer
# (memcheck + racecheck) over the ops, GPU benchmarks. Logs and JSON go to OUTDIR.
#   usage: bash benchmarks/gpu_check.sh OUTDIR [--quick]
# Optional: FER_ARCHIVE=path/to/fer2013.tar.xz [FER_EPOCHS=2 FER_METHOD=dnnrl FER_ARGS=...]
# adds a short FER-2013 training run (throughput, first epochs) at the end.
# Each step has its own time limit so that the whole stays within ~8 minutes.
# SKIP_TESTS=1 / SKIP_SANITIZERS=1 leave those steps out (when the CUDA code is unchanged
# since they last passed and device time is short); SKIP_BUILD=1 / SKIP_BENCH=1 too (the
# build and the benchmarks + profile; benchmarks/gpu_session.sh runs the parts apart).
set -uo pipefail
OUTDIR=${1:?usage: gpu_check.sh OUTDIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
source benchmarks/gpu_common.sh
machine_and_wheels

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  build_inplace "$OUTDIR/build.log" || exit 1
fi
python3 -c "import dnnrl_ext as d; print('extension', d.extension_available(), 'cuda kernels', d.has_cuda_kernels())"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
step "GPU tests"
# (not emu: the CPU emulator's cases of the same tests run in CI, not on the GPU's time)
TEST_FILTER=${TEST_FILTER:-"(cuda or build) and not emu"}
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests -k "$TEST_FILTER" \
  --hypothesis-profile=${HYPOTHESIS_PROFILE:-ci} --maxfail=40 -rf > "$OUTDIR/pytest.log" 2>&1
echo "pytest exit $?"; tail -n 25 "$OUTDIR/pytest.log"
fi

if [ "${SKIP_SANITIZERS:-0}" != 1 ]; then
step "compute-sanitizer memcheck"
timeout ${MEMCHECK_TIMEOUT:-100} compute-sanitizer --tool memcheck --leak-check no --print-limit 20 \
  python3 benchmarks/sanitize_ops.py > "$OUTDIR/sanitizer.log" 2>&1
echo "memcheck exit $?"; tail -n 8 "$OUTDIR/sanitizer.log"
step "compute-sanitizer racecheck"
timeout ${RACECHECK_TIMEOUT:-70} compute-sanitizer --tool racecheck --print-limit 20 \
  python3 benchmarks/sanitize_ops.py --quick >> "$OUTDIR/sanitizer.log" 2>&1
echo "racecheck exit $?"; tail -n 8 "$OUTDIR/sanitizer.log"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
step "benchmarks"
timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_gpu.py $QUICK --out "$OUTDIR/bench_gpu.json"
echo "bench exit $?"
step "small-batch profile (B=128: where the host time goes)"
timeout ${PROFILE_TIMEOUT:-60} python3 benchmarks/profile_small_batch.py --out "$OUTDIR" > "$OUTDIR/profile.log" 2>&1
echo "profile exit $?"; grep -E '^\{' "$OUTDIR/profile.log"
fi
if [ -n "${FER_ARCHIVE:-}" ] && [ -f "$FER_ARCHIVE" ]; then
  step "FER-2013 training check (${FER_EPOCHS:-2} epochs, ${FER_METHOD:-dnnrl})"
  export DNNRL_CACHE=/tmp/dnnrl-cache
  timeout ${TRAIN_TIMEOUT:-240} python3 -m dnnrl train --data "$FER_ARCHIVE" --out /tmp/fer-run --overwrite \
    --method ${FER_METHOD:-dnnrl} --max-epochs ${FER_EPOCHS:-2} --no-progress ${FER_ARGS:-} > "$OUTDIR/train.log" 2>&1
  echo "train exit $?"; tail -n 15 "$OUTDIR/train.log"
  [ -f /tmp/fer-run/results.json ] && cp /tmp/fer-run/results.json "$OUTDIR/fer_results.json"
  for f in /tmp/fer-run/*.jsonl; do [ -f "$f" ] && cp "$f" "$OUTDIR/fer_log.jsonl"; done
fi
step "pack logs (a device call returns at most 8 files)"
(cd "$OUTDIR" && files=$(find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.txt' \) ! -name gpu_check.log) \
  && [ -n "$files" ] && tar -czf logs.tar.gz $files && rm -f $files; ls "$PWD")
step "done"
