"""train_gpt.py whose rank-0 export takes COLLECTIVE_TIMEOUT_SECONDS + 4 s (as MIXED_PRECISION, SIZE_FIT or lrzip can
at full size): the other ranks must wait for it on the long gloo group, not die at the default group's timeout."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402

real_export_blob = train_gpt.export_blob


def slow_export_blob(*args, **kwargs):
    time.sleep(float(os.environ["COLLECTIVE_TIMEOUT_SECONDS"]) + 4)
    return real_export_blob(*args, **kwargs)


train_gpt.export_blob = slow_export_blob
train_gpt.end_distributed_run(train_gpt.main())
