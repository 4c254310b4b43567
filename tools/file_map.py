#!/usr/bin/env python3
"""The sections of train_gpt.py, in data-flow order, with their line ranges: the README's map is checked against
this (tests/test_budget.py).

    python3 tools/file_map.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "train_gpt.py"
BANNER = re.compile(r"^# ([A-Z].*?) ={10,}$")


def sections(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of each banner-headed section; the first starts at line 1 (the docstring)."""
    lines = source.splitlines()
    starts = [(n, match[1].split(":")[0]) for n, line in enumerate(lines, 1) if (match := BANNER.match(line))]
    ends = [number - 1 for number, _ in starts[1:]] + [len(lines)]
    return [(name, 1 if i == 0 else start, end) for i, ((start, name), end) in enumerate(zip(starts, ends))]


def main() -> int:
    for name, first, last in sections(SOURCE.read_text(encoding="utf-8")):
        print(f"| {name} | {first}–{last} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
