#!/usr/bin/env bash
# Screen the federated-pretraining options of issue 9 on one file (k = 10, in-process `scdd simulate`, the
# same ServerApp/ClientApp as `flwr run`). Prints MLP / logistic-regression accuracy on the sites' VALIDATION
# cells (cell-weighted) for every variant: a tuning script never reads test scores.
# Usage: benchmarks/pretraining_screen.sh FILE.h5ad OUT [SEED] [VARIANT...]   (VARIANT names below; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=$1; OUT=$2; SEED=${3:-0}; shift $(( $# < 3 ? $# : 3 ))
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
declare -A V=(
  [2x500]="num-pretrain-rounds=2 vae-local-steps=500 scdg-local-steps=300"
  [10x100]="num-pretrain-rounds=10 vae-local-steps=100 scdg-local-steps=60"
  [25x40]="num-pretrain-rounds=25 vae-local-steps=40 scdg-local-steps=24"
  [50x20]="num-pretrain-rounds=50 vae-local-steps=20 scdg-local-steps=12"
  [30x100-3x]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50"
  [10x300-3x]="num-pretrain-rounds=10 vae-local-steps=300 scdg-local-steps=150"
  [30x100-3x-keep]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50 site-optimizer-state=keep"
  [30x100-3x-cos]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50 local-lr-decay=cosine"
  [30x100-3x-fedavgm]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50 server-optimizer=fedavgm server-lr=0.1"
  [30x100-3x-site]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50 site-covariate=own"
  [30x100-3x-scaffold]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50 drift-control=scaffold"
  [30x100-3x-siten]="num-pretrain-rounds=30 vae-local-steps=100 scdg-local-steps=50 site-covariate=neutral"
  [30x200v]="num-pretrain-rounds=30 vae-local-steps=200 scdg-local-steps=50"
  [15x200-3x]="num-pretrain-rounds=15 vae-local-steps=200 scdg-local-steps=100"
  [10x100-classaware]="num-pretrain-rounds=10 vae-local-steps=100 scdg-local-steps=60 class-aware-aggregation=true"
  [10x100-prox0.01]="num-pretrain-rounds=10 vae-local-steps=100 scdg-local-steps=60 proximal-mu=0.01"
  [10x100-fedadam3e-3]="num-pretrain-rounds=10 vae-local-steps=100 scdg-local-steps=60 server-optimizer=fedadam server-lr=0.003"
  [10x100-fedavgm0.5]="num-pretrain-rounds=10 vae-local-steps=100 scdg-local-steps=60 server-optimizer=fedavgm server-lr=0.5"
)
ORDER=(2x500 10x100 25x40 30x100-3x 10x100-classaware 10x100-prox0.01 10x100-fedadam3e-3 10x100-fedavgm0.5 50x20)
[ $# -gt 0 ] && ORDER=("$@")
mkdir -p "$OUT"
for name in "${ORDER[@]}"; do
  sets=(); for kv in ${V[$name]}; do sets+=(--set "$kv"); done
  t0=$(date +%s)
  .venv/bin/scdd simulate "$FILE" --site-key batch --k 10 --rounds 1 --set report=false --set seed="$SEED" ${sets[@]+"${sets[@]}"} \
    --out "$OUT/$name-s$SEED" > "$OUT/$name-s$SEED.log" 2>&1 || { echo "$name: FAILED (see $OUT/$name-s$SEED.log)"; continue; }
  .venv/bin/python - "$OUT/$name-s$SEED/metrics.json" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
v = m["rounds"][-1]["aggregate"]["validation"]["cell_weighted"]
print(f"{sys.argv[2]:<22} wall {sys.argv[3]:>4} s  VALIDATION MLP {v['mlp']['accuracy']:.3f}  LR {v['logreg']['accuracy']:.3f}", flush=True)
PY
done
