#!/usr/bin/env bash
# The one-GPU check, run in one call of the device tool (a lent H100/H200, minutes of device time):
#   1. the machine: GPU, driver, torch/CUDA/Triton, which FlashAttention modules import;
#   2. the preflight with the default ATTENTION_BACKEND=auto (FA3 required: fails at start if absent);
#   3. the preflight at full size with SDPA and QUANT=gptq: every graph compiled and primed, ms/step at the
#      per-rank batch of an 8-GPU run, eval projections, the size plan;
#   4. a short real run of train_gpt.py under torchrun (NCCL, world 1, compile, bf16) on the FineWeb sample:
#      warmup/priming, late QAT and SWA inside the run, EMA, int6 export, roundtrip, sliding and legal TTT eval.
# Each stage has its own time limit so that a hang in one still returns the others' logs.
# Data: the sample shards and tokenizer copied to data/ (git-ignored) and carried:
#   mkdir -p data/datasets data/tokenizers
#   python3 data/fineweb_sample.py   # the committed FineWeb sample into data/datasets and data/tokenizers
# Logs land in $OUT (the device tool's folder) or ./gpu_out, to be committed as logs/gpu_*.txt.
set -u
source "$(dirname "$0")/gpu_stage.sh"
machine() {
  nvidia-smi
  python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  for module in flash_attn_interface flash_attn; do
    python3 -c "import $module; print('$module imports')" 2>&1 | tail -1
  done
}
machine >"$out/gpu_machine.txt" 2>&1
stage preflight_auto 90 python3 tools/preflight.py --steps 2 --batches 1
ATTENTION_BACKEND=sdpa QUANT=gptq stage preflight_sdpa 230 python3 tools/preflight.py --steps 20 --batches 3 --ranks 8
run_env=(DATA_PATH=./data/datasets/fineweb_sample_sp1024 TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model
         RUN_ID=gpu_short_run ATTENTION_BACKEND=sdpa ITERATIONS=60 WARMDOWN_ITERS=30 WARMUP_STEPS=3
         MAX_WALLCLOCK_SECONDS=0 SWA_ENABLED=1 SWA_EVERY=5 TRAIN_LOG_EVERY=5 VAL_LOSS_EVERY=0
         ARTIFACT_PATH=/tmp/gpu_short_run.int6.ptz)
stage short_run 240 env "${run_env[@]}" torchrun --standalone --nproc_per_node=1 train_gpt.py
cp logs/gpu_short_run.txt "$out/gpu_short_run_log.txt" 2>/dev/null
nvidia-smi --query-gpu=memory.used,memory.total --format=csv >>"$out/gpu_machine.txt" 2>&1
