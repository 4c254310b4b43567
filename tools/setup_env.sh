#!/usr/bin/env bash
# Create .venv at the repository root with everything train_gpt.py and the tests need.
# TORCH_SPEC picks the torch build (default torch==2.13.0; on a CPU-only machine, exporting
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu avoids downloading the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install --quiet -r requirements-dev.txt
# Triton's interpreter (TRITON_INTERPRET=1) runs FUSED_KERNELS' kernels on the CPU in the tests; a CUDA build of
# torch brings the triton it was built with, so only a CPU build gets this one
if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  .venv/bin/pip install --quiet "triton==3.9.0"
fi
.venv/bin/python -c "import torch, numpy, sentencepiece, zstandard, brotli, pytest, triton; print(f'.venv ready: torch {torch.__version__}, triton {triton.__version__}')"
