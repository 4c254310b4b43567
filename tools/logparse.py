"""The lines of a train_gpt.py log that tools read, parsed in one place."""

from __future__ import annotations

import re

FINAL_SCORE = re.compile(r"^final_score pass:(\S+) val_loss:([\d.]+) val_bpb:([\d.]+)$", re.M)


def final_score(text: str) -> tuple[str, float, float] | None:
    """The run's score, (pass, val_loss, val_bpb), from its one `final_score` line: the last pass that ran under its
    configuration (legal_ttt or legal_ttt_tilt, else the sliding window, else the roundtrip)."""
    found = FINAL_SCORE.findall(text)
    return (found[-1][0], float(found[-1][1]), float(found[-1][2])) if found else None


def validation_counts(text: str) -> tuple[int, int] | None:
    """(tokens, bytes) of the validation set the run scored, from its `val_loader:shards` line."""
    found = re.findall(r"^val_loader:shards \S+ tokens:(\d+) bytes:(\d+)\b", text, re.M)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def with_block(text: str, marks: tuple[str, str], block: str) -> str:
    """text with `block` between its two marker lines (a table generated from logs into a doc), the markers kept."""
    if marks[0] not in text or marks[1] not in text:
        raise ValueError(f"no {marks[0]} ... {marks[1]} block")
    head, rest = text.split(marks[0], 1)
    return f"{head}{marks[0]}\n{block}\n{marks[1]}{rest.split(marks[1], 1)[1]}"
