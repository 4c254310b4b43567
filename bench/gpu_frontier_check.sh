#!/usr/bin/env bash
# The frontier's GPU check in ONE device call (at most 540 s on one GPU, issue 24): bench/gpu_frontier_check.py's
# six stages, logged to $OUT/gpu_frontier_check.txt (commit it as logs/gpu_frontier_check.txt).
# Without a GPU: python3 bench/gpu_frontier_check.py --dry-run runs the same stages at tiny shapes on the CPU.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-./gpu_out}
mkdir -p "$out"
PYTHONUNBUFFERED=1 timeout 560 python3 bench/gpu_frontier_check.py --budget 500 >"$out/gpu_frontier_check.txt" 2>&1
echo "exit $? ($out/gpu_frontier_check.txt)"
