#!/usr/bin/env bash
# Reruns only scdd and scdd_noopt on every file of ../shared/data and merges their rows into the existing
# results (scdd benchmark --merge): what to run after a change to scdd's defaults, without redoing the
# baselines (whose code did not change). Then rewrites SUMMARY.md.
# Usage: benchmarks/rerun_scdd.sh [SEEDS] [OUT]     (defaults: 3 seeds, benchmarks/results; the split hashes must match the results it merges into)
source "$(dirname "$0")/common.sh"
for results in "$OUT"/*/results.json; do  # every dataset that already has results to merge into
  name=$(basename "$(dirname "$results")")
  [ -f "$DATA/$name.h5ad" ] || { echo "skip $name (not in $DATA)"; continue; }
  .venv/bin/scdd benchmark "$DATA/$name.h5ad" --site-key batch --sites 3 --k 1,10,50 --seeds "$SEEDS" \
    --methods scdd,scdd_noopt --merge --out "$OUT"
done
.venv/bin/python benchmarks/summarize.py "$OUT"
