#!/usr/bin/env bash
# FER-2013 training probe on one GPU: several configurations trained at the same time
# (the Table 1 network leaves the card mostly idle at batch 128), each for a few
# epochs, to see which ones learn. Per-epoch logs and results go to OUTDIR.
#   usage: FER_ARCHIVE=.carry/fer2013.tar.xz bash benchmarks/fer_probe.sh OUTDIR
# Options (environment): FER_EPOCHS (8), PROBE_TIMEOUT per run in s (420),
# (four runs share the card: ~25 full-network epochs each in about 5 minutes on an H200 (estimate)),
# PROBE_CONFIGS: "name=train flags;name=train flags;..." (default: the set below),
# BUILD=1 builds the extension first (else the runs use the reference backend when
# the compiled kernels are missing); EXPORT=<config name> exports that run as a bundle.
# Output: OUTDIR/probe_runs.tar.gz (each run's log.jsonl, results.json, config.json,
# report.md, stdout) [+ OUTDIR/<name>_bundle.pt and export.log]. A config whose flags contain @INIT@ gets
# "--init-from <dir of the config named by PROBE_INIT>" and starts after the others.
set -uo pipefail
OUTDIR=${1:?usage: fer_probe.sh OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" DNNRL_CACHE=/tmp/dnnrl-cache
EPOCHS=${FER_EPOCHS:-8}
LIMIT=${PROBE_TIMEOUT:-420}
if [ "${BUILD:-0}" = 1 ]; then
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    timeout 240 python3 setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1 || { tail -n 30 "$OUTDIR/build.log"; exit 1; }
fi
python3 -m dnnrl train --help > /dev/null || exit 1
# Decode once into the cache so the runs do not race on it.
timeout 60 python3 -c "import sys; from dnnrl.data import load_dataset; load_dataset(sys.argv[1])" "$FER_ARCHIVE"
# Default set (docs/app.md, "FER-2013: what makes the triplet losses learn"): the softmax
# baseline, the pure exp-triplet default, and the joint softmax + triplet runs.
# All four with random flips and flip test-time averaging (+1-3 points for every method
# on the CPU, order unchanged).
F="--flip true --tta flip"
DEFAULT_CONFIGS="dnn=--method dnn --lr 0.01 $F;\
dnnrl_pure=--method dnnrl --lr 0.01 $F;\
dnnrl_joint=--method dnnrl --mining easy_positive --softmax-weight 1 --reduction mean --lr 0.01 $F;\
tdnn_joint=--method tdnn --mining easy_positive --softmax-weight 1 --reduction mean --lr 0.01 $F"
IFS=';' read -ra ITEMS <<< "${PROBE_CONFIGS:-$DEFAULT_CONFIGS}"
run() {  # name flags
  timeout "$LIMIT" python3 -m dnnrl train --data "$FER_ARCHIVE" --out "/tmp/probe-$1" --overwrite \
    --max-epochs "$EPOCHS" --no-progress $2 > "/tmp/probe-$1.log" 2>&1
}
names=(); later=()
for item in "${ITEMS[@]}"; do
  name=${item%%=*}; flags=${item#*=}; names+=("$name")
  if [[ "$flags" == *@INIT@* ]]; then later+=("$item"); continue; fi
  run "$name" "$flags" &
done
wait
for item in "${later[@]}"; do
  name=${item%%=*}; flags=${item#*=}
  run "$name" "${flags//@INIT@/--init-from /tmp/probe-${PROBE_INIT:-dnn}}" &
done
wait
# One archive for every run's logs (a device call returns at most 8 files).
mkdir -p /tmp/probe-pack
for name in "${names[@]}"; do
  echo "== $name"; grep -E "epoch|accuracy" "/tmp/probe-$name.log" | tail -n 12
  mkdir -p "/tmp/probe-pack/$name"
  cp "/tmp/probe-$name.log" "/tmp/probe-pack/$name/stdout.log" 2>/dev/null
  for f in log.jsonl results.json config.json report.md; do
    cp "/tmp/probe-$name/$f" "/tmp/probe-pack/$name/" 2>/dev/null
  done
done
tar -czf "$OUTDIR/probe_runs.tar.gz" -C /tmp/probe-pack .
# EXPORT=name: also write that run's model as a bundle (fp16 weights + PCA gallery,
# the package's shipping format, < 12 MB) beside it, e.g. to ship as the default model.
if [ -n "${EXPORT:-}" ] && [ -d "/tmp/probe-$EXPORT" ]; then
  timeout 90 python3 -m dnnrl export --checkpoint "/tmp/probe-$EXPORT" --data "$FER_ARCHIVE" \
    --out "$OUTDIR/${EXPORT}_bundle.pt" --gallery-dim ${GALLERY_DIM:-96} --sweep-dims 64,128 \
    --note "fer_probe.sh run $EXPORT: ${FER_EPOCHS} epochs" > "$OUTDIR/export.log" 2>&1
  echo "export exit $?"; tail -n 5 "$OUTDIR/export.log"
fi
