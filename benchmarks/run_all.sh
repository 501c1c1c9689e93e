#!/usr/bin/env bash
# Runs the DESIGN §7 benchmark on every file of ../shared/data (the team datasets), one process per
# file so each dataset's results.md/results.json land as soon as it finishes, in two parallel
# single-threaded streams (2 cores).
# Usage: benchmarks/run_all.sh [SEEDS] [OUT]     (defaults: 3 seeds, benchmarks/results)
source "$(dirname "$0")/common.sh"
stream() {
  for name in "$@"; do
    [ -f "$DATA/$name.h5ad" ] || { echo "skip $name (not in $DATA)"; continue; }
    .venv/bin/scdd benchmark "$DATA/$name.h5ad" --site-key batch --sites 3 --k 1,10,50 --seeds "$SEEDS" --work "${WORK:-runs/benchmark-work}" --out "$OUT"
  done
}
stream human_kidney_scdcc pbmc4k_10x_scdcc pancreas_3study_cepo pbmc_scvi_200genes pbmc_sorted_mudan > "$OUT.a.log" 2>&1 &
a=$!
stream pbmc_ding_2tech_scannotate cellbench_lung6_hvg cellbench_lung5 kang_pbmc_muscat cbmc_citeseq_scdcc > "$OUT.b.log" 2>&1 &
b=$!
wait $a $b
.venv/bin/python benchmarks/summarize.py "$OUT" "${WORK:-runs/benchmark-work}"
