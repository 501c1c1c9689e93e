# Sourced by the benchmark scripts: repository root as working directory, arguments [SEEDS] [OUT],
# the team datasets folder (DATA, default ../shared/data) and single-threaded numerics.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEEDS=${1:-3}
OUT=${2:-benchmarks/results}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
