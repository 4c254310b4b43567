#!/usr/bin/env bash
# The frontier switches on one GPU, in one call of the device tool (after bench/gpu_check.sh's data setup):
#   1. FUSED_KERNELS' Triton soft-capped CE against the eager math, and both timed (bench/gpu_frontier_check.py);
#   2. the preflight at full size with PRESET=frontier, fused kernels off and on: every graph (plain, looped,
#      eval) compiled before the clock, ms/step of the plain and the looped graph at the per-rank batch of 8 ranks,
#      and the projected eval passes (sliding, document LoRA TTT with its phases, the n-gram tilt's precompute);
#   3. the same with ATTENTION_BACKEND=auto: DOC_ISOLATION through FA3's varlen kernel (fails naming the wheel if
#      flash_attn_interface.flash_attn_varlen_func cannot load).
# Logs land in $OUT or ./gpu_out as gpu_frontier_*.txt, to be committed under logs/.
set -u
source "$(dirname "$0")/gpu_stage.sh"
stage frontier_kernels 90 python3 bench/gpu_frontier_check.py
PRESET=frontier ATTENTION_BACKEND=sdpa stage frontier_preflight 200 python3 tools/preflight.py --steps 10 --batches 2 --ranks 8
PRESET=frontier ATTENTION_BACKEND=sdpa FUSED_KERNELS=1 stage frontier_preflight_fused 200 \
  python3 tools/preflight.py --steps 10 --batches 2 --ranks 8
PRESET=frontier stage frontier_preflight_varlen 200 python3 tools/preflight.py --steps 10 --batches 2 --ranks 8
