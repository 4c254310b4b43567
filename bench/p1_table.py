#!/usr/bin/env python3
"""Markdown rows of P1 results from train_gpt.py logs: bench/p1_table.py logs/p1/p1_NAME_seedS.txt ...

Columns: post-average (pre-quant), int6 roundtrip, sliding, legal TTT val_bpb (exact lines), the artifact's
model bytes, the final step_avg, and each value's difference from the first log given (the reference).

    bench/p1_table.py --index     # every log in logs/p1/: its last scored pass and the commit whose code ran
    bench/p1_table.py --annotate docs/RESULTS.md README.md   # each table row's log gets " @ <commit>" after it

The index is docs/RESULTS.md's last section; the annotations name, in every results row, the commit whose
train_gpt.py wrote the log (tests/test_measure_tools.py keeps both current)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULE = "=" * 100
INDEX_HEADING = "## Every P1 log and the code that ran it"
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


ANNOTATED_LOG = re.compile(r"`(logs/[\w./-]+\.txt)`(?: @ (?:[0-9a-f]{7,}|uncommitted|record code|unknown))?")


def annotate(markdown: str) -> str:
    """In every table row, each existing log `logs/….txt` is followed by " @ <commit>": its code's first commit;
    "@ uncommitted" for this script's code that no commit holds (a working tree), "@ record code" for a record's
    own script (#549's, #1089's, #1855's)."""

    def commit_of(match: re.Match) -> str:
        path = REPO / match.group(1)
        if not path.is_file():
            return match.group(0)
        text = path.read_text(encoding="utf-8", errors="replace")
        commit = code_commit(text)
        if commit.startswith("not in"):
            commit = "uncommitted" if "\nPRESETS = {" in text.split("\n" + RULE + "\n", 1)[0] else "record code"
        return f"`{match.group(1)}` @ {commit}"

    body, index = (markdown.split(INDEX_HEADING, 1) + [None])[:2]  # the index has its own commit column
    lines = [ANNOTATED_LOG.sub(commit_of, line) if line.startswith("|") else line for line in body.split("\n")]
    return "\n".join(lines) + ("" if index is None else INDEX_HEADING + index)


def main(paths: list[str]) -> None:
    if paths == ["--index"]:
        print("\n".join(index_rows()))
        return
    if paths[:1] == ["--annotate"]:
        for name in paths[1:]:
            path = Path(name)
            path.write_text(annotate(path.read_text(encoding="utf-8")), encoding="utf-8")
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
