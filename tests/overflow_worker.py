"""train_gpt.py with DOC_ISOLATION through the varlen stand-in, where rank 0 alone cannot fit its batch's segments
(its limit set to 0): the fault one rank sees in the middle of a step (tests/test_faults.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
import varlen_standin  # noqa: E402

train_gpt.select_attention_backend = lambda *args: ("varlen_standin", varlen_standin.varlen_attention)
if os.environ.get("RANK") == "0":
    train_gpt.VARLEN_MAX_SEGMENTS = 0
status = train_gpt.main()
if train_gpt.dist.is_initialized():
    train_gpt.end_distributed_run(status)
sys.exit(status)
