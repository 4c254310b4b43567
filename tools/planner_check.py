#!/usr/bin/env python3
"""Measure the DRY_RUN size planner's two approximations on the configured model (default: #549's).

    python3 tools/planner_check.py --run-id planner_check_default

1. Stand-in distribution: the planner fills every quantized tensor with Student-t samples
   (train_gpt.PLANNER_TAIL_DOF degrees of freedom, fitted to #549's logged 15.79-15.90 MB artifacts).
   This tool also packs Gaussian stand-ins — what untrained weights look like — to show why they mislead.
2. Row sampling: the planner compresses one row in 8 of each quantized tensor and scales the ratio up.
   This tool compresses the whole Student-t state too and reports the relative error and both timings.

The configuration follows the environment exactly like train_gpt.py (QUANT, COMPRESSOR, QUANT_BITS_*, model
shape). Everything goes to logs/<run-id>.txt, which starts with train_gpt.py's code like a training log.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def full_size(state: dict[str, torch.Tensor], h: tg.Hyperparameters) -> tuple[int, float]:
    """Bytes of the artifact encoded from every row (no sampling), and the seconds it took."""
    started = time.perf_counter()
    tensors, schemes = tg.quantize_state(state, h)
    return len(tg.encode_artifact(tensors, schemes, h)), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args()
    h = tg.Hyperparameters(dict(os.environ, RUN_ID=args.run_id))
    run = tg.RunContext(h)
    tg.log_run_header(run, Path(tg.__file__).read_bytes().decode("utf-8"))
    run.log(
        f"planner_check quant:{h.quant} compressor:{h.compressor} byte_shuffle:{int(h.byte_shuffle)} "
        f"bits_mlp/attn/embed/tables:{h.quant_bits_mlp}/{h.quant_bits_attn}/{h.quant_bits_embed}/{h.quant_bits_tables}"
    )
    started = time.perf_counter()
    planned = tg.plan_artifact(h)
    plan_seconds = time.perf_counter() - started
    run.log(
        f"planner_check planner student_t_dof:{tg.PLANNER_TAIL_DOF} rows_sampled:1/8 "
        f"predicted_model_bytes:{planned} seconds:{plan_seconds:.1f}"
    )
    exact, exact_seconds = full_size(tg.stand_in_state(h, torch.distributions.StudentT(tg.PLANNER_TAIL_DOF)), h)
    run.log(
        f"planner_check student_t all_rows model_bytes:{exact} seconds:{exact_seconds:.1f} "
        f"sampling_error:{100 * (planned - exact) / exact:+.2f}%"
    )
    gaussian, gaussian_seconds = full_size(tg.stand_in_state(h, torch.distributions.Normal(0.0, 1.0)), h)
    run.log(
        f"planner_check gaussian all_rows model_bytes:{gaussian} seconds:{gaussian_seconds:.1f} "
        f"vs_student_t:{100 * (gaussian - exact) / exact:+.2f}%"
    )
    run.seal_log()
    return 0


if __name__ == "__main__":
    sys.exit(main())
