#!/usr/bin/env bash
# Do later distillation rounds earn their keep? From one fixed pretrained generator (a run's pretrained/ folder),
# 3 distillation rounds with the warm start and the server's fine-tuning on and off (k = 10, in-process
# `scdd simulate`). Prints MLP / logistic-regression accuracy per round on the sites' VALIDATION cells.
# Usage: benchmarks/rounds_screen.sh FILE.h5ad PRETRAINED_DIR OUT [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=$1; PRE=$(cd "$2" && pwd); OUT=$3; SEED=${4:-0}
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$OUT"
run() {  # name --set ...
  local name=$1; shift
  .venv/bin/scdd simulate "$FILE" --site-key batch --k 10 --rounds 3 --set report=false --set seed="$SEED" --set "pretrained-path=$PRE" "$@" \
    --out "$OUT/$name-s$SEED" > "$OUT/$name-s$SEED.log" 2>&1 || { echo "$name: FAILED"; return; }
  .venv/bin/python - "$OUT/$name-s$SEED/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
val = [r["aggregate"]["validation"]["cell_weighted"] for r in m["rounds"]]
print(f"{sys.argv[2]:<24} VALIDATION MLP / LR per round " + "  ".join(f"{v['mlp']['accuracy']:.3f} / {v['logreg']['accuracy']:.3f}" for v in val), flush=True)
PY
}
run warm+finetune
run fresh+finetune --set distill-warm-start=false
run warm-no-finetune --set finetune-steps=0
