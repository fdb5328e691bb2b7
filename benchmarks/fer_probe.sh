#!/usr/bin/env bash
# Short FER-2013 training probe on one GPU: several configurations trained at the
# same time (the Table 1 network leaves the card mostly idle at batch 128), each for
# a few epochs, to see which ones learn. Per-epoch logs and results go to OUTDIR.
#   usage: FER_ARCHIVE=.carry/fer2013.tar.xz bash benchmarks/fer_probe.sh OUTDIR
set -uo pipefail
OUTDIR=${1:?usage: fer_probe.sh OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" DNNRL_CACHE=/tmp/dnnrl-cache
EPOCHS=${FER_EPOCHS:-8}
LIMIT=${PROBE_TIMEOUT:-120}
python3 -m dnnrl train --help > /dev/null || exit 1
# Decode once into the cache so the runs do not race on it.
timeout 60 python3 -c "import sys; from dnnrl.data import load_dataset; load_dataset(sys.argv[1])" "$FER_ARCHIVE"
declare -A CONFIGS=(
  [dnnrl_lr01]="--method dnnrl --lr 0.01"
  [dnnrl_lr001]="--method dnnrl --lr 0.001"
  [dnn_lr01]="--method dnn --lr 0.01"
)
for name in "${!CONFIGS[@]}"; do
  timeout "$LIMIT" python3 -m dnnrl train --data "$FER_ARCHIVE" --out "/tmp/probe-$name" --backend reference \
    --max-epochs "$EPOCHS" --no-progress ${CONFIGS[$name]} > "/tmp/probe-$name.log" 2>&1 &
done
wait
for name in "${!CONFIGS[@]}"; do
  echo "== $name: ${CONFIGS[$name]}"; grep -E "epoch|accuracy" "/tmp/probe-$name.log" | tail -n 12
  cp "/tmp/probe-$name/log.jsonl" "$OUTDIR/$name.jsonl" 2>/dev/null
  cp "/tmp/probe-$name/results.json" "$OUTDIR/$name.results.json" 2>/dev/null
done
