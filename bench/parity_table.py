#!/usr/bin/env python3
"""Markdown tables of the presets against the records' own code, from the logs of bench/parity_run.sh:

    python3 bench/parity_table.py            # pr1089 vs #1089 and frontier_caseops vs #1855, seeds 1337 / 42 / 2024

A row per seed with both logs: the step-1 train_loss of each code, the steps both logged, the first step whose
difference is over 1e-4 (4-decimal logs: a difference of 1e-4 is rounding) and the largest difference, then each
score of both codes (the record's label mapped by tools/compare_logs.py) and the mean over the seeds that have it.
docs/RESULTS.md holds the output (tests/test_measure_tools.py keeps it current)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import compare_logs  # noqa: E402

SEEDS = (1337, 42, 2024)
PRESETS = {
    # preset: (record's code in the log name, its label, the scores compared: (name, column title))
    "pr1089": (
        "rec1089",
        "#1089",
        (("post_average", "post-average"), ("roundtrip", "roundtrip"), ("sliding", "sliding s64")),
    ),
    "frontier_caseops": (
        "rec1855",
        "#1855",
        (("post_average", "post-average"), ("roundtrip", "quantized"), ("legal_ttt", "phased LoRA TTT")),
    ),
}
TOLERANCE = 1e-4


def rows(preset: str, folder: Path = REPO / "logs" / "p1") -> list[str]:
    record, label, columns = PRESETS[preset]
    head = ["seed", f"step 1 ({label} / ours)", "steps", "first over 1e-4", "max \\|Δ\\|"]
    lines = ["| " + " | ".join(head + [f"{title} ({label} / ours)" for _, title in columns]) + " | logs |"]
    lines.append("|---" * (len(head) + len(columns) + 1) + "|")
    means = {name: ([], []) for name, _ in columns}
    for seed in SEEDS:
        paths = [folder / f"parity_{preset}_{code}_s{seed}.txt" for code in (record, "ours")]
        if not all(path.is_file() for path in paths):
            continue
        texts = [path.read_text(encoding="utf-8", errors="replace") for path in paths]
        curves = [compare_logs.train_losses(text) for text in texts]
        result = compare_logs.compare(*curves, TOLERANCE)
        scores = [compare_logs.scores(text) for text in texts]
        cells = [
            str(seed),
            f"{curves[0].get(1, float('nan')):.4f} / {curves[1].get(1, float('nan')):.4f}",
            str(len(result["steps"])),
            str(result["first_over"] or "none"),
            f"{abs(result['diffs'][result['worst']]):.4f} (step {result['worst']})",
        ]
        for name, _ in columns:
            pair = [score.get(name) for score in scores]
            cells.append(" / ".join("—" if value is None else f"{value:.5f}" for value in pair))
            for values, value in zip(means[name], pair):
                if value is not None:
                    values.append(value)
        logs = ", ".join(f"`{path.relative_to(REPO)}`" for path in paths)
        lines.append("| " + " | ".join(cells) + f" | {logs} |")
    mean_cells = ["mean", "", "", "", ""]
    for name, _ in columns:
        record_values, our_values = means[name]
        if record_values and len(record_values) == len(our_values):
            record_mean, our_mean = (sum(v) / len(v) for v in (record_values, our_values))
            mean_cells.append(f"{record_mean:.5f} / {our_mean:.5f} (ours {our_mean - record_mean:+.5f})")
        else:
            mean_cells.append("")
    lines.append("| " + " | ".join(mean_cells) + " | |")
    return lines


def main() -> None:
    for preset in PRESETS:
        print("\n".join(rows(preset)) + "\n")


if __name__ == "__main__":
    main()
