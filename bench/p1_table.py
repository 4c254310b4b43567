#!/usr/bin/env python3
"""Markdown rows of P1 results from train_gpt.py logs: bench/p1_table.py logs/p1/p1_NAME_seedS.txt ...

Columns: post-average (pre-quant), int6 roundtrip, sliding, legal TTT val_bpb (exact lines), the artifact's
model bytes, the final step_avg, and each value's difference from the first log given (the reference).

    bench/p1_table.py --index     # every log in logs/p1/: its last scored pass and the commit whose code ran

The index is docs/RESULTS.md's last section (tests/test_measure_tools.py keeps it current)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULE = "=" * 100
SCORED = re.compile(r"^(\S+)_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", re.M)

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


def code_commit(text: str) -> str:
    """The commit whose train_gpt.py is the code at the top of the log (git's blob id of it): the first commit
    that has it; "not in this repository's history" (a working tree's code, or another project's: #549's logs)."""
    code = text.split("\n" + RULE + "\n", 1)[0].encode("utf-8")
    blob = hashlib.sha1(b"blob %d\0" % len(code) + code).hexdigest()
    try:
        found = subprocess.run(
            ["git", "log", "--format=%h", "--reverse", f"--find-object={blob}", "--", "train_gpt.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return found[0] if found else "not in this repository's history"


def index_rows(folder: Path = REPO / "logs" / "p1") -> list[str]:
    """A row per log: its name, its last scored pass and val_bpb (its final_score line's pass when it has one), the
    commit that ran."""
    rows = ["| log | last scored pass | val_bpb | commit |", "|---|---|---|---|"]
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        scored = [m for m in SCORED.findall(text) if not m[0].startswith("DIAGNOSTIC")]
        last = f"`{scored[-1][0]}` | {float(scored[-1][2]):.5f}" if scored else "— | —"
        rows.append(f"| `{path.relative_to(REPO)}` | {last} | {code_commit(text)} |")
    return rows


def main(paths: list[str]) -> None:
    if paths == ["--index"]:
        print("\n".join(index_rows()))
        return
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
