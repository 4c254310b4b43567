"""The style rules of DEVELOPERS.md, as a test: no function over 60 lines, the README's map current (no line budget:
"size follows from clarity, never the reverse")."""

from __future__ import annotations

import ast

from conftest import REPO

SOURCE = (REPO / "train_gpt.py").read_text(encoding="utf-8")


def test_no_function_is_longer_than_60_lines():
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(SOURCE))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"functions over 60 lines: {long}"


def test_the_readmes_map_of_the_file_is_current():
    """README's map: every section of train_gpt.py with its current line range (tools/file_map.py), in order."""
    import re
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import file_map

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([A-Z][\w ]+) \| (\d+)–(\d+) \|", readme, re.M)
    assert [(name, int(a), int(b)) for name, a, b in rows] == file_map.sections(SOURCE)
