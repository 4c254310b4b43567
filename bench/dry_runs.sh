#!/usr/bin/env bash
# The size plans of docs/ARTIFACT.md's table: DRY_RUN=1 of each configuration at full size, with the readable
# train_gpt.py and with its packed copy (tools/pack_code.py), logged as logs/dry_run_NAME_{readable,packed}.txt;
# then tools/size_table.py --annotate docs/ARTIFACT.md rewrites the table from those logs.
#     bash bench/dry_runs.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
packed=$(mktemp -d /tmp/dry_runs.XXXXXX)/train_gpt.py
.venv/bin/python tools/pack_code.py train_gpt.py -o "$packed"
configs=(
  "default:"
  "frontier:PRESET=frontier"
  "pr1089:PRESET=pr1089"
  "pr518_legal:PRESET=pr518_legal"
  "frontier_vocab4096:PRESET=frontier VOCAB_SIZE=4096"
  "frontier_vocab8192:PRESET=frontier VOCAB_SIZE=8192"
  "frontier_sp8192:PRESET=frontier_sp8192"
  "frontier_2014:PRESET=frontier_2014"
)
for config in "${configs[@]}"; do
  name=${config%%:*}
  read -r -a vars <<<"${config#*:}"
  for code in readable packed; do
    script=train_gpt.py
    [[ $code == packed ]] && script=$packed
    rm -f "logs/dry_run_${name}_${code}.txt"
    env OMP_NUM_THREADS=2 DRY_RUN=1 RUN_ID="dry_run_${name}_${code}" "${vars[@]}" .venv/bin/python "$script" \
      | grep "^size_plan " || { echo "dry_runs.sh: $name ($code) failed" >&2; exit 1; }
  done
done
.venv/bin/python tools/size_table.py --annotate docs/ARTIFACT.md
