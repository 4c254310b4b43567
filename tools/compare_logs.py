#!/usr/bin/env python3
"""Compare two training logs step by step: where do their train_loss curves part, and by how much.

    python3 tools/compare_logs.py logs/ours.txt ../peer_runs/logs/rec549.txt [--tolerance 1e-4] [--every 25]

Reads every `step:N/M train_loss:X` line of both logs (this script's, #549's and #1089's format) or `N/M train_loss: X`
(#1855's; log every step with TRAIN_LOG_EVERY=1), prints the steps both logged with both losses and their difference (every
--every steps, plus the first step over the tolerance and the last step), then a summary line:
`compare_logs steps:N first_over:<step or none> max_abs_diff:<d> at_step:<s> mean_abs_diff:<d>`, and the final
scores both logs have (post-average, roundtrip, sliding, TTT), with their differences. With identical
initial weights and identical data the curves can only differ by rounding until a behavioural difference
acts: the first step over the tolerance is where to look. Exit status 0 when no step is over the tolerance.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logparse import final_score  # noqa: E402

STEP_LINE = re.compile(r"^(?:step:)?(\d+)/\d+ train_loss: ?([-\d.naif]+)", re.M)
# The same score under each script's label: this script's first, then #549's / #1089's, then #1855's.
SCORES = (
    ("post_average", (r"DIAGNOSTIC post_average", r"DIAGNOSTIC post_ema", r"diagnostic pre-quantization post-ema")),
    ("roundtrip", (r"final_int6_roundtrip_exact", r"diagnostic quantized")),
    ("sliding", (r"final_int6_sliding_window_exact", r"final_int6_sliding_window_s64_exact")),
    ("legal_ttt", (r"legal_ttt_exact", r"quantized_ttt_phased")),
)


def train_losses(text: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(text)}


def scores(text: str) -> dict[str, float]:
    """The last val_bpb of each score the log has; `final` is the run's own score (its final_score line)."""
    score = final_score(text)
    found = {"final": score[2]} if score else {}
    for name, labels in SCORES:
        for label in labels:
            values = re.findall(rf"^{label} val_loss:\S+ val_bpb:([\d.]+)", text, re.M)
            if values:
                found[name] = float(values[-1])
                break
    return found


def compare(a: dict[int, float], b: dict[int, float], tolerance: float) -> dict:
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("compare_logs: the two logs share no logged step (set TRAIN_LOG_EVERY=1 in both runs)")
    diffs = {s: a[s] - b[s] for s in steps}
    # Logged losses have 4 decimals: a difference of exactly the tolerance is not over it (float noise aside);
    # NaN counts as over.
    over = [s for s in steps if not abs(diffs[s]) <= tolerance + 1e-9]
    worst = max(steps, key=lambda s: abs(diffs[s]))
    return dict(
        steps=steps,
        diffs=diffs,
        first_over=over[0] if over else None,
        worst=worst,
        mean_abs=sum(abs(d) for d in diffs.values()) / len(steps),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |difference| counted as rounding")
    parser.add_argument("--every", type=int, default=25, help="print every N-th shared step")
    args = parser.parse_args()
    texts = [path.read_text(encoding="utf-8") for path in (args.first, args.second)]
    a, b = (train_losses(text) for text in texts)
    result = compare(a, b, args.tolerance)
    steps, diffs = result["steps"], result["diffs"]
    print(f"{'step':>6} {args.first.name:>24} {args.second.name:>24} {'difference':>12}")
    for step in steps:
        if step % args.every == 0 or step in (steps[0], steps[-1], result["first_over"]):
            marker = "  <- first over the tolerance" if step == result["first_over"] else ""
            print(f"{step:>6} {a[step]:>24.4f} {b[step]:>24.4f} {diffs[step]:>+12.4f}{marker}")
    print(
        f"compare_logs steps:{len(steps)} first_over:{result['first_over'] or 'none'} "
        f"max_abs_diff:{abs(diffs[result['worst']]):.4f} at_step:{result['worst']} "
        f"mean_abs_diff:{result['mean_abs']:.5f} tolerance:{args.tolerance:g}"
    )
    score_a, score_b = (scores(text) for text in texts)
    for name in (n for n, _ in SCORES if n in score_a and n in score_b):
        print(f"score {name} {score_a[name]:.8f} {score_b[name]:.8f} difference:{score_a[name] - score_b[name]:+.8f}")
    return 0 if result["first_over"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
