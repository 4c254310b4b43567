# P1: the small CPU benchmark configuration. Source it from the repository root, then run `python3 train_gpt.py`.
# Every implementation compared on P1 (bench/ANCHORS.md) used these values: the same model shape, data and number of
# steps (no wallclock cap), fp32 on the CPU. Names follow the #549 record's variables. The data is the committed
# FineWeb sample (data/fineweb_sample/SOURCES.md), unpacked on first use.
python3 data/fineweb_sample.py >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export DATA_PATH=./data/datasets/fineweb_sample_sp1024
export TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model
export SEED=1337 NUM_LAYERS=6 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 VOCAB_SIZE=1024
export TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 ITERATIONS=300 WARMDOWN_ITERS=100
export WARMUP_STEPS=2 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 VAL_BATCH_SIZE=65536
export MUON_MOMENTUM_WARMUP_STEPS=100 EMA_DECAY=0.98
export VE_LAYERS=4,5 VE_DIM=64 XSA_LAST_N=2 BIGRAM_VOCAB_SIZE=1536 BIGRAM_DIM=64 EVAL_STRIDE=64
export TTT_ENABLED=1 TTT_CHUNK_TOKENS=16384 TTT_BATCH_SEQS=16 TTT_FREEZE_BLOCKS=0
