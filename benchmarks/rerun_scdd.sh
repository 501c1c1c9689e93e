#!/usr/bin/env bash
# Reruns only scdd and scdd_noopt on every file of ../shared/data and merges their rows into the existing
# results (scdd benchmark --merge): what to run after a change to scdd's defaults, without redoing the
# baselines (whose code did not change). Then rewrites SUMMARY.md.
# Usage: benchmarks/rerun_scdd.sh [SEEDS] [OUT]     (defaults: 2 seeds, benchmarks/results; ~50 min on 1 core)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-2}
OUT=${2:-benchmarks/results}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for name in kang_pbmc_muscat pbmc4k_10x_scdcc pbmc_ding_2tech_scannotate pancreas_3study_cepo cellbench_lung6_hvg \
            pbmc_sorted_mudan cellbench_lung5 human_kidney_scdcc pbmc_scvi_200genes cbmc_citeseq_scdcc; do
  [ -f "$DATA/$name.h5ad" ] || { echo "skip $name (not in $DATA)"; continue; }
  [ -f "$OUT/$name/results.json" ] || { echo "skip $name (no earlier results to merge into: run run_all.sh first)"; continue; }
  .venv/bin/scdd benchmark "$DATA/$name.h5ad" --site-key batch --sites 3 --k 1,10,50 --seeds "$SEEDS" \
    --methods scdd,scdd_noopt --merge --out "$OUT"
done
.venv/bin/python benchmarks/summarize.py "$OUT"
