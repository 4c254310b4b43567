"""Run a train_gpt.py (argv[1]) as __main__ with rank 1's clock running fast: the clock skew between the
ranks of a real multi-node or multi-GPU run, exaggerated so that any decision taken on a rank's own clock shows."""

from __future__ import annotations

import os
import runpy
import sys
import time

CLOCK_RATE, CLOCK_OFFSET = 1.5, 0.25  # rank 1 sees 1.5x the elapsed time, from a different origin

if os.environ.get("RANK") == "1":
    real_clock = time.perf_counter
    time.perf_counter = lambda: CLOCK_OFFSET + CLOCK_RATE * real_clock()

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
