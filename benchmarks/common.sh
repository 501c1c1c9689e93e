# Sourced by the benchmark scripts: repository root as working directory, arguments [SEEDS] [OUT],
# the team datasets folder (DATA, default ../shared/data) and single-threaded numerics.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEEDS=${1:-3}
OUT=${2:-benchmarks/results}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# run_streams FN: FN over every team file in two parallel single-threaded streams (logs OUT.a.log, OUT.b.log),
# the multi-site files and two Dirichlet splits first; returns when both are done.
run_streams() {
  local fn=$1
  "$fn" cellbench_lung5 pancreas_3study_cepo pbmc4k_10x_scdcc human_kidney_scdcc pbmc_scvi_200genes > "$OUT.a.log" 2>&1 &
  local a=$!
  "$fn" kang_pbmc_muscat cbmc_citeseq_scdcc cellbench_lung6_hvg pbmc_ding_2tech_scannotate pbmc_sorted_mudan > "$OUT.b.log" 2>&1 &
  local b=$!
  wait $a $b
}
