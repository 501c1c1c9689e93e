#!/usr/bin/env bash
# Paired screen of dp-denoise (joint vs site) in the shipped federation: both arms run with the same run key, so every
# site draws the same DP noise for every release (the noise is keyed by run key and release) and only the coordinator's
# denoising of the class means differs. One seed, one epsilon; VALIDATION cells choose (metrics.json's validation blocks).
#   [MODES="joint site"] benchmarks/dp_denoise_pair.sh FILE OUT_DIR SEED EPSILON [KEY=VALUE ...]
# then: python benchmarks/dp_summary.py OUT_DIR/joint; python benchmarks/dp_summary.py OUT_DIR/site
# Arms whose releases differ (another noise calibration: code of another commit) must not share a site cache: each
# site's ledger refuses a second, different release under one run key. Give each such arm its own TMPDIR holding a
# copy of the sites' fedscdd-cache-$UID/dp-secret (same secret, same noise draws; a fresh ledger).
set -euo pipefail
file=$1; out=$2; seed=$3; eps=$4; shift 4
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
name=$(basename "$file" .h5ad)
sets=()
for kv in "$@"; do sets+=(--set "$kv"); done
for mode in ${MODES:-joint site}; do
  run="$out/$mode/$name-eps$eps-seed$seed"  # the same folder name in both arms: the run key starts with it
  if [ -f "$run/metrics.json" ]; then echo "done: $run"; continue; fi
  mkdir -p "$out/$mode"
  echo "== $name epsilon=$eps seed=$seed dp-denoise=$mode"
  # the run key's random suffix fixed (server.orchestration draws it with secrets.token_hex): a screen, never a deployment
  python -c 'import sys, types, server.orchestration as o; from server.cli import main
o.secrets = types.SimpleNamespace(token_hex=lambda n: "paired-screen"); sys.exit(main(sys.argv[1:]))' \
    simulate "$file" --out "$run" --set dp-epsilon="$eps" --set seed="$seed" --set dp-denoise="$mode" "${sets[@]}" \
    > "$run.log" 2>&1 || echo "FAILED ($run.log): $(tail -n 1 "$run.log")"
done
