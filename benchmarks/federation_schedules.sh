#!/usr/bin/env bash
# FedAvg pretraining schedules and round behaviour on the bundled kang file (k = 10, 4 sites), in-process
# (`scdd simulate`, the same ServerApp/ClientApp as `flwr run`). Prints MLP / logistic-regression accuracy
# per distillation round for each variant, on the sites' VALIDATION cells (a tuning script never reads test scores).
# Usage: benchmarks/federation_schedules.sh [OUT]     (default OUT: runs/schedules; about 20 min on 1 core)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/schedules}
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
DATA=shared/example_data/kang_pbmc_muscat.h5ad
run() {  # name rounds --set ... ; prints one line per variant
  local name=$1 rounds=$2; shift 2
  .venv/bin/scdd simulate --data "$DATA" --site-key batch --k 10 --rounds "$rounds" --set report=false "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  .venv/bin/python - "$OUT/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
val = [r["aggregate"]["validation"]["cell_weighted"] for r in m["rounds"]]
acc = [(round(v["mlp"]["accuracy"], 3), round(v["logreg"]["accuracy"], 3)) for v in val]
print(f"{sys.argv[2]:<34} pretrain {m['phase_seconds'].get('pretrain', 0):6.0f} s   VALIDATION MLP/LR per round {acc}", flush=True)
PY
}
mkdir -p "$OUT"
# 1. schedules: FedAvg rounds x (VAE / SCDG local steps per site)
run "4x100-150" 2 --set num-pretrain-rounds=4 --set vae-local-steps=100 --set scdg-local-steps=150
run "4x100-375" 2 --set num-pretrain-rounds=4 --set vae-local-steps=100 --set scdg-local-steps=375
run "4x250-150" 2 --set num-pretrain-rounds=4 --set vae-local-steps=250 --set scdg-local-steps=150
run "2x500-300-default" 2
# 2. rounds: 4 distillation rounds from one fixed pretrained generator, warm start and fine-tuning on/off
base="$(pwd)/$OUT/4x100-150"
run "warm+finetune-default" 4 --set "pretrained-path=$base"
run "warm-no-finetune" 4 --set "pretrained-path=$base" --set finetune-steps=0
run "fresh+finetune" 4 --set "pretrained-path=$base" --set distill-warm-start=false
run "fresh-no-finetune" 4 --set "pretrained-path=$base" --set distill-warm-start=false --set finetune-steps=0
