#!/usr/bin/env bash
# Runs the DESIGN §7 benchmark on every file of ../shared/data (the team datasets), one process per
# file so each dataset's results.md/results.json land as soon as it finishes, in two parallel
# single-threaded streams (2 cores).
# Usage: benchmarks/run_all.sh [SEEDS] [OUT]     (defaults: 2 seeds, benchmarks/results)
source "$(dirname "$0")/common.sh"
stream() {
  for name in "$@"; do
    [ -f "$DATA/$name.h5ad" ] || { echo "skip $name (not in $DATA)"; continue; }
    .venv/bin/scdd benchmark "$DATA/$name.h5ad" --site-key batch --sites 3 --k 1,10,50 --seeds "$SEEDS" --out "$OUT"
  done
}
stream kang_pbmc_muscat pbmc_ding_2tech_scannotate pancreas_3study_cepo cellbench_lung5 pbmc4k_10x_scdcc > "$OUT.a.log" 2>&1 &
a=$!
stream cellbench_lung6_hvg pbmc_sorted_mudan human_kidney_scdcc cbmc_citeseq_scdcc pbmc_scvi_200genes > "$OUT.b.log" 2>&1 &
b=$!
wait $a $b
.venv/bin/python benchmarks/summarize.py "$OUT"
