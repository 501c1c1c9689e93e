#!/usr/bin/env bash
# What each site gains by joining, on the shipped federation (k = 10, one distillation round, default run config):
# runs `scdd simulate` per file and seed into WORK/NAME/seedS/scdd-k10 (the layout of `scdd benchmark --work`), then
# prints, per site, the federated MLP, the local-only MLP and the federated MLP fine-tuned at the site (test cells).
# Usage: benchmarks/site_gains.sh WORK "SEEDS" FILE.h5ad...     e.g. benchmarks/site_gains.sh runs/gains "0 1 2" \
#        ../shared/data/kang_pbmc_muscat.h5ad ../shared/data/cbmc_citeseq_scdcc.h5ad
# Files with a `batch` column are split by it, the others into 3 Dirichlet(0.5) sites. A finished run is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$1; SEEDS=$2; shift 2
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
for file in "$@"; do
  name=$(basename "$file" .h5ad)
  for seed in $SEEDS; do
    out="$WORK/$name/seed$seed/scdd-k10"
    [ -f "$out/metrics.json" ] && continue
    mkdir -p "$(dirname "$out")"
    .venv/bin/scdd simulate "$file" --site-key batch --num-sites 3 --k 10 --rounds 1 --set report=false \
      --set seed="$seed" --out "$out" > "$out.log" 2>&1 || { echo "$name seed $seed: FAILED (see $out.log)"; continue; }
  done
done
.venv/bin/python benchmarks/summarize.py --gains "$WORK"
