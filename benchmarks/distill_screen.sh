#!/usr/bin/env bash
# Screen distillation settings from one fixed pretrained generator (a finished run's pretrained/ folder): every
# variant distils with the same seed, k = 10, one round, in-process `scdd simulate` (the shipped ServerApp and
# ClientApp). Prints MLP / logistic-regression accuracy on the sites' VALIDATION cells (cell-weighted).
# Usage: benchmarks/distill_screen.sh FILE.h5ad PRETRAINED_DIR OUT SEED VARIANT...
#   VARIANT: NAME or NAME:key=value,key=value (run-config keys), e.g. default tstar200:distill-t-star=200
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 5 ] || { echo "usage: $0 FILE.h5ad PRETRAINED_DIR OUT SEED VARIANT..." >&2; exit 2; }
FILE=$1; PRE=$(cd "$2" && pwd); OUT=$3; SEED=$4; shift 4
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$OUT"
for variant in "$@"; do
  name=${variant%%:*}; sets=()
  if [[ $variant == *:* ]]; then IFS=, read -ra kvs <<< "${variant#*:}"; for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done; fi
  t0=$(date +%s)
  .venv/bin/scdd simulate "$FILE" --site-key batch --k 10 --rounds 1 --set report=false --set seed="$SEED" \
    --set "pretrained-path=$PRE" ${sets[@]+"${sets[@]}"} --out "$OUT/$name-s$SEED" > "$OUT/$name-s$SEED.log" 2>&1 \
    || { echo "$name: FAILED (see $OUT/$name-s$SEED.log)"; continue; }
  .venv/bin/python - "$OUT/$name-s$SEED/metrics.json" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
v = m["rounds"][-1]["aggregate"]["validation"]["cell_weighted"]
print(f"{sys.argv[2]:<22} wall {sys.argv[3]:>4} s  VALIDATION MLP {v['mlp']['accuracy']:.3f}  LR {v['logreg']['accuracy']:.3f}", flush=True)
PY
done
