#!/usr/bin/env python3
"""Markdown rows of P1 results from train_gpt.py logs: bench/p1_table.py logs/p1/p1_NAME_seedS.txt ...

Columns: post-average (pre-quant), int6 roundtrip, sliding, legal TTT val_bpb (exact lines), the artifact's
model bytes, the final step_avg, and each value's difference from the first log given (the reference)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

METRICS = {
    "pre-quant": r"DIAGNOSTIC post_average_exact .*val_bpb:([\d.]+)",
    "roundtrip": r"final_int6_roundtrip_exact .*val_bpb:([\d.]+)",
    "sliding": r"final_int6_sliding_window_exact .*val_bpb:([\d.]+)",
    "TTT": r"legal_ttt_exact .*val_bpb:([\d.]+)",
}


def read(path: Path) -> dict:
    text = path.read_text()
    row = {}
    for name, pattern in METRICS.items():
        found = re.findall(pattern, text)
        row[name] = float(found[-1]) if found else None
    model = re.findall(r"^artifact path:\S+ code_bytes:\d+ model_bytes:(\d+)", text, re.M)
    steps = re.findall(r"^step:\d+/\d+ train_loss:\S+ train_time:\d+ms step_avg:([\d.]+)ms", text, re.M)
    row["model bytes"] = int(model[-1]) if model else None
    row["step ms"] = float(steps[-1]) if steps else None
    return row


def main(paths: list[str]) -> None:
    rows = [(Path(p).stem, read(Path(p))) for p in paths]
    reference = rows[0][1]
    print("| run | " + " | ".join(list(METRICS) + ["model bytes", "step ms"]) + " |")
    print("|---" * (len(METRICS) + 3) + "|")
    for name, row in rows:
        cells = []
        for key in METRICS:
            value, ref = row[key], reference[key]
            cells.append(
                "—"
                if value is None
                else f"{value:.4f}" + (f" ({value - ref:+.4f})" if ref and row is not reference else "")
            )
        cells.append("—" if row["model bytes"] is None else f"{row['model bytes']:,}")
        cells.append("—" if row["step ms"] is None else f"{row['step ms']:.0f}")
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
