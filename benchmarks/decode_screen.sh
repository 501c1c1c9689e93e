#!/usr/bin/env bash
# How codes become cells (decode-mode): accuracy and fidelity on the sites' VALIDATION cells, one file, one seed.
# One federation at the default run config (decode-mode=expected) pretrains the models; the other modes
# distill again from the same models (pretrained-path), so the modes differ in decoding only. Prints, per
# mode, validation MLP / logistic-regression accuracy (cell-weighted) and the site-mean fidelity:
# marker-gene overlap (top 50 wilcoxon per class), zero fraction synthetic / real, per-gene variance
# correlation, MMD in 50 PCs. A tuning script: it never reads test scores.
# Usage: benchmarks/decode_screen.sh FILE.h5ad OUT [SEED] [MODE...]   (modes: expected sample counts, MODE:S = S samples
# per code, e.g. counts:3; default: expected sample counts counts:3 counts:5)
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=$1; OUT=$2; SEED=${3:-0}; shift $(( $# < 3 ? $# : 3 ))
MODES=(expected sample counts counts:3 counts:5); [ $# -gt 0 ] && MODES=("$@")
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$OUT"
base="$OUT/expected-s$SEED"
for variant in "${MODES[@]}"; do
  mode=${variant%%:*}; per=1; [[ "$variant" == *:* ]] && per=${variant##*:}
  # the first run (expected) pretrains; every other run, and a repeated expected one, distills again from its models
  run="$OUT/$mode-x$per-s$SEED"; extra=(--set samples-per-code="$per")
  if [ -d "$base/pretrained" ]; then extra+=(--set pretrained-path="$base/pretrained")
  elif [ "$variant" = expected ]; then run="$base"
  else echo "$variant: needs $base/pretrained (run mode expected first)"; continue; fi
  .venv/bin/scdd simulate "$FILE" --site-key batch --k 10 --set report=false --set seed="$SEED" --set decode-mode="$mode" \
    "${extra[@]}" --out "$run" > "$run.log" 2>&1 || { echo "$variant: FAILED (see $run.log)"; continue; }
  .venv/bin/python - "$run/metrics.json" "$variant" <<'PY'
import json, sys
import numpy as np
m = json.load(open(sys.argv[1]))
r = m["rounds"][-1]
v = r["aggregate"]["validation"]["cell_weighted"]
fid = r["aggregate"]["validation"]["fidelity"]  # mean over sites of each site's synthetic-vs-validation-cells fidelity
print(f"{sys.argv[2]:<9} VALIDATION MLP {v['mlp']['accuracy']:.3f}  LR {v['logreg']['accuracy']:.3f}  markers {fid['marker_overlap']:.3f}  "
      f"zeros {fid['zero_fraction_synthetic']:.3f} / {fid['zero_fraction_real']:.3f}  var_corr {fid['var_corr']:.3f}  mmd {fid['mmd_pca']:.3f}", flush=True)
PY
done
