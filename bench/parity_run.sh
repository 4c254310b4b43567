#!/usr/bin/env bash
# One run of a preset or of its record's code at the record-parity shape (docs/RESULTS.md, "Presets against the
# records' code"): bench/parity_run.sh pr1089|frontier_caseops|frontier_2014 ours|PEER_SCRIPT SEED [VAR=VALUE ...]
# PEER_SCRIPT is the record's train_gpt.py patched to run on the CPU in fp32 (#1089 for pr1089, #1855 for
# frontier_caseops, #2014 for frontier_2014; not in this repository: the record's MIT code is run beside it, never copied in). Both read the
# same variables (the project accepts the records' spellings) and the committed samples; TRAIN_LOG_EVERY=1 so
# tools/compare_logs.py can read the two curves step by step. PARITY_TAG=name (with VAR=VALUE overrides) names a
# variant of ours in the log's name. The log is logs/p1/parity_PRESET_CODE_sSEED.txt
# (CODE = ours or rec1089 / rec1855). The peers run in their own folder (they write fixed artifact names there).
# frontier_caseops reads the committed CaseOps export with its validation cut to the first 20 documents
# (bench/parity_val_cut.py); ours runs #1855's evaluation: phased document LoRA TTT without the n-gram tilt, its
# phases over the first 12 of 20 documents (PHASED_TTT_PREFIX_DOCS, one variable for both codes), with no
# evaluation budget (#1855 has none; this CPU is slow).
# VAL_BATCH_TOKENS=2048: one 256-token row per validation batch, so that #1855 scores every full row as ours does
# (it truncates the rows to a multiple of its batch: 96 of 114 at 65,536) and cuts no document at a row's end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
preset=$1 code=$2 seed=$3
shift 3
python3 "$repo/data/fineweb_sample.py" >/dev/null
data=$repo/data/datasets tokenizers=$repo/data/tokenizers
common=(NUM_LAYERS=6 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 XSA_LAST_N=6 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256
  TRAIN_BATCH_TOKENS=8192 ITERATIONS=20 WARMUP_STEPS=2 MUON_MOMENTUM_WARMUP_STEPS=7 MAX_WALLCLOCK_SECONDS=0
  TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 EMA_DECAY=0.98 GPTQ_CALIBRATION_BATCHES=16)
case $preset in
  pr1089)
    peer=rec1089
    shape=(DATA_PATH=$data/fineweb_sample_sp1024 TOKENIZER_PATH=$tokenizers/fineweb_1024_bpe.model VOCAB_SIZE=1024
      VE_LAYERS=4,5 VE_DIM=64 NGRAM_BUCKETS=1536 EVAL_STRIDE=64 WARMDOWN_ITERS=7 VAL_BATCH_SIZE=65536) ;;
  frontier_caseops|frontier_2014)
    # #1855's scored run's own overrides (its README), which its code defaults do not hold
    "$repo/.venv/bin/python" "$repo/bench/parity_val_cut.py" "$data/fineweb_sample_caseops_record" \
      "$data/fineweb_sample_caseops_record_val20" 20 >/dev/null
    shape=(DATA_PATH=$data/fineweb_sample_caseops_record_val20
      TOKENIZER_PATH=$tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model VOCAB_SIZE=8192
      VAL_BATCH_TOKENS=2048 CASEOPS_ENABLED=1 NUM_LOOPS=2 LOOP_START=2 LOOP_END=3 PARALLEL_START_LAYER=4 TTT_EVAL_SEQ_LEN=256
      TTT_BATCH_SIZE=4 PHASED_TTT_PREFIX_DOCS=12 PHASED_TTT_NUM_PHASES=3 GLOBAL_TTT_CHUNK_TOKENS=4096
      EMBED_BITS=7 MATRIX_LR=0.026 MIN_LR=0.1 MLP_CLIP_SIGMAS=11.5 ATTN_CLIP_SIGMAS=13.0 EMBED_CLIP_SIGMAS=14.0
      GRAD_CLIP_NORM=0.3 TTT_CHUNK_SIZE=48 MUON_BACKEND_STEPS=5 GLOBAL_TTT_MOMENTUM=0.9 WARMDOWN_FRAC=0.85
      BETA2=0.99 TTT_BETA2=0.99 TTT_WEIGHT_DECAY=0.5 TTT_LORA_RANK=80 SPARSE_ATTN_GATE_SCALE=0.5
      GATED_ATTN_QUANT_GATE=1 SPARSE_ATTN_GATE_ENABLED=1 GATE_WINDOW=12 SMEAR_GATE_ENABLED=1 LQER_ENABLED=1
      LQER_ASYM_ENABLED=1 LQER_RANK=4 LQER_FACTOR_BITS=4 LQER_ASYM_GROUP=64 LQER_TOP_K=3 COMPRESSOR=brotli
      NGRAM_TILT=0 TTT_CHUNK_TOKENS=4096 EVAL_BUDGET_SECONDS=100000)
    peer=rec1855
    if [[ $preset == frontier_2014 ]]; then
      # then #2014's scored run's settings scaled to this shape (shared/peers/README.md's tiny run; the later value
      # of a variable wins): the 1024@0.1,2048@0.7,3072@1.0 schedule as 64/128/256 by step (every stage divides the
      # 1,024-token micro-batch), 2 re-warm steps (32 of ~4,885 scale to less than one), one phase.
      # EVAL_STRIDE=128 only satisfies ours' check (it must divide EVAL_SEQ_LEN); neither code slides here.
      peer=rec2014
      shape+=(PHASED_TTT_NUM_PHASES=1 TRAIN_SEQ_SCHEDULE=64@0.1,128@0.7,256@1.0 TRAIN_SEQ_SCHEDULE_MODE=step
        SEQ_CHANGE_WARMUP_STEPS=2 COMPILE_SHAPE_WARMUP=1 QK_GAIN_INIT=5.25 AWQ_LITE_ENABLED=1 AWQ_LITE_BITS=8
        AWQ_LITE_GROUP_TOP_K=1 AWQ_LITE_GROUP_SIZE=64 ASYM_LOGIT_RESCALE=1 EVAL_INCLUDE_TAIL=1 TTT_MASK=no_qv
        TTT_LOCAL_LR_MULT=0.75 TTT_SHORT_SCORE_FIRST_ENABLED=1 TTT_SHORT_SCORE_FIRST_STEPS=256:8,2000:24
        EVAL_STRIDE=128)
    fi ;;
  *) echo "parity_run.sh: preset must be pr1089, frontier_caseops or frontier_2014, got '$preset'" >&2; exit 2 ;;
esac
if [[ $code == ours ]]; then
  name=ours
  cmd=("$repo/.venv/bin/python" "$repo/train_gpt.py")
  extra=(PRESET=$preset ARTIFACT_PATH=/tmp/parity_${preset}_ours_s$seed.ptz)
  workdir=$repo
else
  [[ -f $code ]] || { echo "parity_run.sh: peer script '$code' does not exist" >&2; exit 2; }
  name=$peer
  cmd=("$repo/.venv/bin/python" "$(cd "$(dirname "$code")" && pwd)/$(basename "$code")")
  extra=()
  workdir=$(mktemp -d /tmp/parity_peer.XXXXXX)
fi
run_id=parity_${preset}_${name}${PARITY_TAG:+_$PARITY_TAG}_s$seed  # PARITY_TAG: a variant of ours
log=$repo/logs/p1/$run_id.txt
[[ -e $log ]] && { echo "parity_run.sh: $log exists; remove it to rerun" >&2; exit 2; }
log_id=$run_id
[[ $code == ours ]] && log_id=p1/$run_id
cd "$workdir"
env OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} SEED=$seed RUN_ID=$log_id "${common[@]}" "${shape[@]}" "${extra[@]}" "$@" \
  "${cmd[@]}"
if [[ $code != ours ]]; then mkdir -p "$repo/logs/p1" && cp "logs/$run_id.txt" "$log"; fi
echo "log: $log"
