#!/usr/bin/env bash
# The GPU checks, for one call of the device tool (a lent H100/H200, minutes of device time, at most 600 s a call):
#   bash bench/gpu_check.sh GROUP...      (no GROUP: basic)
# Groups, each a few stages with their own time limit, so that a hang in one still returns the others' logs:
#   basic     (~560 s) the machine (GPU, driver, torch/CUDA/Triton, which FlashAttention modules import); the
#             preflight with ATTENTION_BACKEND=auto (FA3 required: fails at start if absent); the preflight at full
#             size with SDPA and QUANT=gptq (graphs compiled and primed, ms/step at an 8-GPU run's per-rank batch,
#             eval projections, size plan); a short real run under torchrun (NCCL world 1, compile, bf16): priming,
#             late QAT and SWA, EMA, int6 export, roundtrip, sliding and legal TTT.
#   faults    (~550 s) the training watch's CUDA path and the signal path, compiled, on a small model:
#             MATRIX_LR=1e30 must exit 4 ("training diverged") with no artifact; SIGINT after step 5 must exit 130
#             with the artifact written; EVAL_ONLY=1 on it must exit 0 with finite scores.
#   pr1089    (~300 s) bench/gpu_seeds_check.py: PRESET=pr1089 at full size, compile/priming, QAT graphs, Turbo-Muon.
#   frontier  (~540 s) bench/gpu_frontier_check.py's six stages for PRESET=frontier_caseops (its --dry-run runs them at tiny
#             shapes on the CPU).
# Data: python3 data/fineweb_sample.py unpacks the committed FineWeb sample into data/ (git-ignored: carry it).
# Logs land in $OUT (the device tool's folder) or ./gpu_out as gpu_<stage>.txt, to be committed as logs/gpu_*.txt.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-./gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
sample=(DATA_PATH=./data/datasets/fineweb_sample_sp1024 TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model)

stage() {  # name, seconds, command...: the command's output into $out/gpu_NAME.txt, then its exit status and time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/gpu_$name.txt" 2>&1
  local rc=$?
  echo "# exit $rc after $((SECONDS - start)) s (limit $limit s)" >>"$out/gpu_$name.txt"
  echo "stage $name: exit $rc, $((SECONDS - start)) s"
}

machine() {
  nvidia-smi
  python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  for module in flash_attn_interface flash_attn; do
    python3 -c "import $module; print('$module imports')" 2>&1 | tail -1
  done
}

basic() {
  stage machine 30 bash -c "$(declare -f machine); machine"
  stage preflight_auto 90 python3 tools/preflight.py --steps 2 --batches 1
  ATTENTION_BACKEND=sdpa QUANT=gptq stage preflight_sdpa 230 python3 tools/preflight.py --steps 20 --batches 3 --ranks 8
  local run=("${sample[@]}" RUN_ID=gpu_short_run ATTENTION_BACKEND=sdpa ITERATIONS=60 WARMDOWN_ITERS=30
    WARMUP_STEPS=3 MAX_WALLCLOCK_SECONDS=0 SWA_ENABLED=1 SWA_EVERY=5 TRAIN_LOG_EVERY=5 VAL_LOSS_EVERY=0
    ARTIFACT_PATH=/tmp/gpu_short_run.int6.ptz)
  stage short_run 240 env "${run[@]}" torchrun --standalone --nproc_per_node=1 train_gpt.py
  cp logs/gpu_short_run.txt "$out/gpu_short_run_log.txt" 2>/dev/null
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv >>"$out/gpu_machine.txt" 2>&1
}

faults() {
  local small=("${sample[@]}" NUM_LAYERS=4 MODEL_DIM=256 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=512 EVAL_SEQ_LEN=512
    EVAL_STRIDE=256 TRAIN_BATCH_TOKENS=16384 WARMUP_STEPS=2 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0
    TRAIN_LOG_EVERY=1 VE_LAYERS=2,3 XSA_LAST_N=2 TTT_CHUNK_TOKENS=65536 ATTENTION_BACKEND=sdpa
    ARTIFACT_PATH=/tmp/gpu_faults.ptz)
  rm -f /tmp/gpu_faults.ptz
  stage faults_nan 150 env "${small[@]}" RUN_ID=gpu_faults_nan_run MATRIX_LR=1e30 ITERATIONS=200 python3 train_gpt.py
  ls -l /tmp/gpu_faults.ptz >>"$out/gpu_faults_nan.txt" 2>&1 # expected: no such file
  # SIGINT once step 5 is logged (a bash -c, since timeout runs commands, not functions)
  stage faults_sigint 200 env "${small[@]}" RUN_ID=gpu_faults_sigint_run ITERATIONS=100000 bash -c '
    python3 train_gpt.py & pid=$!
    until grep -q "^step:5/" logs/gpu_faults_sigint_run.txt 2>/dev/null; do kill -0 $pid || exit 9; sleep 0.5; done
    kill -INT $pid; wait $pid'
  stage faults_eval_only 200 env "${small[@]}" RUN_ID=gpu_faults_eval_only_run EVAL_ONLY=1 python3 train_gpt.py
  cp logs/gpu_faults_*_run.txt "$out/" 2>/dev/null
}

pr1089() {
  stage seeds_check 300 env "${sample[@]}" ATTENTION_BACKEND=sdpa python3 bench/gpu_seeds_check.py
}

frontier() {
  stage frontier_check 560 python3 bench/gpu_frontier_check.py --budget 500
}

python3 data/fineweb_sample.py >/dev/null || echo "warning: the FineWeb sample could not be unpacked"
for group in "${@:-basic}"; do
  case $group in
    basic | faults | pr1089 | frontier) "$group" ;;
    *) echo "gpu_check.sh: unknown group '$group' (basic, faults, pr1089, frontier)" >&2 && exit 2 ;;
  esac
done
