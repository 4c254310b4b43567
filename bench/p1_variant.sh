#!/usr/bin/env bash
# One P1 run of a named variant: bench/p1_variant.sh NAME RUN_SEED [VAR=VALUE ...]
# Sources bench/p1_env.sh (P1: 6 layers x 128, 300 steps, fp32, the FineWeb sample), then applies the
# overrides, so a variant differs from the P1 default only in what it names. Variables that P1 sets but the
# variant wants from its PRESET are given as VAR= (empty = unset). The log is logs/p1/p1_NAME_seedRUN_SEED.txt.
# OMP_NUM_THREADS may be set by the caller (two runs side by side at 1 thread each on this 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 run_seed=$2
shift 2
threads=${OMP_NUM_THREADS:-2}
source bench/p1_env.sh
export OMP_NUM_THREADS=$threads SEED=$run_seed RUN_ID=p1/p1_${name}_seed${run_seed} ARTIFACT_PATH=/tmp/p1_${name}_seed${run_seed}.ptz
for assignment in "$@"; do
  if [[ $assignment == *= ]]; then unset "${assignment%=}"; else export "$assignment"; fi
done
exec .venv/bin/python train_gpt.py
