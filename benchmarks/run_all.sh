#!/usr/bin/env bash
# Runs the DESIGN §7 benchmark on every file of ../shared/data (the team datasets), one process per
# file so each dataset's results.md/results.json land as soon as it finishes, in two parallel
# single-threaded streams (2 cores).
# Usage: benchmarks/run_all.sh [SEEDS] [OUT]     (defaults: 3 seeds, benchmarks/results)
source "$(dirname "$0")/common.sh"
stream() {
  for name in "$@"; do
    [ -f "$DATA/$name.h5ad" ] || { echo "skip $name (not in $DATA)"; continue; }
    .venv/bin/scdd benchmark "$DATA/$name.h5ad" --site-key batch --num-sites 3 --k 1,10,50 --seeds "$SEEDS" --work "${WORK:-runs/benchmark-work}" --out "$OUT"
  done
}
run_streams stream
.venv/bin/python benchmarks/summarize.py "$OUT" "${WORK:-runs/benchmark-work}"
