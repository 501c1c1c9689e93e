#!/usr/bin/env bash
# Accuracy vs epsilon of the shipped federation: `scdd simulate` on FILE at each epsilon (0 = no DP), one seed, same schedule.
#   benchmarks/dp_curve.sh FILE OUT_DIR SEED "EPSILONS" [KEY=VALUE ...]
# e.g. benchmarks/dp_curve.sh ../shared/data/cbmc_citeseq_scdcc.h5ad runs/dp 0 "1 2 4 8"   (the DP default:
#      dp-pretraining=statistics); the previous release's DP-SGD runs added dp-pretraining=dp-sgd num-pretrain-rounds=10
#      vae-local-steps=30 scdg-local-steps=30
# Summarise with: python benchmarks/dp_summary.py OUT_DIR
set -euo pipefail
file=$1; out=$2; seed=$3; epsilons=$4; shift 4
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
name=$(basename "$file" .h5ad)
sets=()
for kv in "$@"; do sets+=(--set "$kv"); done
for eps in $epsilons; do
  run="$out/$name-eps$eps-seed$seed"
  if [ -f "$run/metrics.json" ] && [ -f "$run/report.html" ]; then echo "done: $run"; continue; fi
  echo "== $name epsilon=$eps seed=$seed"
  python -m server.cli simulate "$file" --out "$run" --set dp-epsilon="$eps" --set seed="$seed" --set report=true "${sets[@]}" \
    > "$run.log" 2>&1 || echo "FAILED ($run.log): $(tail -n 1 "$run.log")"
done
