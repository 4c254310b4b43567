"""train_gpt.py with DOC_ISOLATION through the varlen stand-in (tests/varlen_standin.py) instead of SDPA's mask, so
training, calibration, every scoring pass and both TTT modes hand the kernel host-built, bucketed cu_seqlens.
Prints the sequence counts the kernel saw (largest, and the largest non-empty)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
import varlen_standin  # noqa: E402

real_select = train_gpt.select_attention_backend


def select_standin(requested, device_type, dtype, doc_isolation=False, max_segment=0):
    if doc_isolation:
        return "varlen_standin", varlen_standin.limited_to(max_segment)
    return real_select(requested, device_type, dtype, doc_isolation, max_segment)


train_gpt.select_attention_backend = select_standin
status = train_gpt.main()
calls = varlen_standin.calls
print(
    f"varlen_calls:{len(calls)} max_sequences:{max(c[0] for c in calls)} max_real:{max(c[1] for c in calls)}",
    flush=True,
)
if train_gpt.dist.is_initialized():
    train_gpt.end_distributed_run(status)
sys.exit(status)
