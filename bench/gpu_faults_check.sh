#!/usr/bin/env bash
# The fault handling on one GPU, in one call of the device tool (after bench/gpu_check.sh's data setup): the
# training watch's CUDA path (flags copied to pinned memory, read through CUDA events two steps later) and the
# signal path, compiled, on a small model:
#   1. MATRIX_LR=1e30: the run must stop with exit 4 ("training diverged") within a few steps, no artifact;
#   2. SIGINT after step 5: exit 130, the artifact written, "interrupted: SIGINT" in the log;
#   3. EVAL_ONLY=1 on that artifact: exit 0 and finite scores.
# Logs land in $OUT or ./gpu_out as gpu_faults_*.txt, to be committed under logs/.
set -u
source "$(dirname "$0")/gpu_stage.sh"
small=(DATA_PATH=./data/datasets/fineweb_sample_sp1024 TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model
       NUM_LAYERS=4 MODEL_DIM=256 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=512 EVAL_SEQ_LEN=512 EVAL_STRIDE=256
       TRAIN_BATCH_TOKENS=16384 WARMUP_STEPS=2 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1
       VE_LAYERS=2,3 XSA_LAST_N=2 TTT_CHUNK_TOKENS=65536 ATTENTION_BACKEND=sdpa ARTIFACT_PATH=/tmp/gpu_faults.ptz)
rm -f /tmp/gpu_faults.ptz
stage faults_nan 150 env "${small[@]}" RUN_ID=gpu_faults_nan_run MATRIX_LR=1e30 ITERATIONS=200 python3 train_gpt.py
ls -l /tmp/gpu_faults.ptz >>"$out/gpu_faults_nan.txt" 2>&1  # expected: no such file
# SIGINT once step 5 is logged (a bash -c, since timeout runs commands, not functions)
stage faults_sigint 200 env "${small[@]}" RUN_ID=gpu_faults_sigint_run ITERATIONS=100000 bash -c '
  python3 train_gpt.py & pid=$!
  until grep -q "^step:5/" logs/gpu_faults_sigint_run.txt 2>/dev/null; do kill -0 $pid || exit 9; sleep 0.5; done
  kill -INT $pid; wait $pid'
stage faults_eval_only 200 env "${small[@]}" RUN_ID=gpu_faults_eval_only_run EVAL_ONLY=1 python3 train_gpt.py
cp logs/gpu_faults_*_run.txt "$out/" 2>/dev/null
