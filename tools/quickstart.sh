#!/usr/bin/env bash
# Quick start: set up .venv, build the embedded sample (offline), then train and evaluate a small model on
# the CPU end to end. Writes logs/<RUN_ID>.txt and the artifact quickstart_model.int6.ptz.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/python data/build_sample.py
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export DATA_PATH=./data/datasets/kjv_sp1024 TOKENIZER_PATH=./data/tokenizers/kjv_1024_bpe.model
if [[ -z "${RUN_ID:-}" ]]; then
  rm -f logs/quickstart.txt  # the demo's own previous log: train_gpt.py refuses to append a run to a log
fi
export RUN_ID="${RUN_ID:-quickstart}" ARTIFACT_PATH=quickstart_model.int6.ptz
export NUM_LAYERS=6 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 VE_LAYERS=4,5 VE_DIM=64 XSA_LAST_N=2 BIGRAM_DIM=64
export TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 ITERATIONS=200 WARMDOWN_ITERS=80
export WARMUP_STEPS=2 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=25 VAL_BATCH_SIZE=65536
export MUON_MOMENTUM_WARMUP_STEPS=100 EMA_DECAY=0.98
exec .venv/bin/python train_gpt.py
