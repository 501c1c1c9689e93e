#!/usr/bin/env bash
# Reruns the federated rows (scdd: the shipped federation, scdd_pooled, scdd_noopt, fedavg_mlp) on every file of
# ../shared/data that has results, merges them into the existing results (scdd benchmark --merge), and rewrites
# SUMMARY.md: what to run after a change to the federation's or scdd's defaults, without redoing the baselines
# (whose code did not change). Two single-threaded streams; the federated runs are kept under WORK.
# Usage: benchmarks/rerun_scdd.sh [SEEDS] [OUT]     (defaults: 3 seeds, benchmarks/results; KS=1,10,50 WORK=runs/benchmark-work
#        EVALUATORS=mlp,logreg,knn METHODS=scdd,scdd_pooled,scdd_noopt,fedavg_mlp in the environment; the split hashes must match the results it merges into)
source "$(dirname "$0")/common.sh"
KS=${KS:-1,10,50}
WORK=${WORK:-runs/benchmark-work}
EVALUATORS=${EVALUATORS:-mlp,logreg,knn}
METHODS=${METHODS:-scdd,scdd_pooled,scdd_noopt,fedavg_mlp}
stream() {
  for name in "$@"; do
    [ -f "$DATA/$name.h5ad" ] && [ -f "$OUT/$name/results.json" ] || { echo "skip $name (not in $DATA or no results to merge into)"; continue; }
    .venv/bin/scdd benchmark "$DATA/$name.h5ad" --site-key batch --num-sites 3 --k "$KS" --seeds "$SEEDS" --evaluators "$EVALUATORS" \
      --methods "$METHODS" --merge --work "$WORK" --out "$OUT"
  done
}
run_streams stream
.venv/bin/python benchmarks/summarize.py "$OUT" "$WORK"
