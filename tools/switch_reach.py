#!/usr/bin/env python3
"""How far a switch reaches into train_gpt.py: the functions outside Hyperparameters that read its attribute
(h.<name>, model.<name>, ...), by qualified name; Hyperparameters' own reads (the env read, cross-checks of settings)
are listed apart. A switch is read once and dispatched once (the house style): its reach should stay small.

    python3 tools/switch_reach.py                       # DOC_ISOLATION, NUM_LOOPS, TTT_MODE, NGRAM_TILT
    python3 tools/switch_reach.py COMPRESSOR QUANT
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "train_gpt.py"
DEFAULT_SWITCHES = ("DOC_ISOLATION", "NUM_LOOPS", "TTT_MODE", "NGRAM_TILT")


def reach(source: str, switch: str) -> list[str]:
    """Qualified names of the outermost functions (methods as Class.method) that read attribute switch.lower()
    (assignments to it are not reads)."""
    attribute, found = switch.lower(), []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                reads = (n for n in ast.walk(child) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load))
                if any(n.attr == attribute for n in reads):
                    found.append(prefix + child.name)

    visit(ast.parse(source), "")
    return found


def main(argv: list[str]) -> int:
    source = SOURCE.read_text(encoding="utf-8")
    for switch in argv or DEFAULT_SWITCHES:
        functions = reach(source, switch)
        settings = [f for f in functions if f.startswith("Hyperparameters.")]
        outside = [f for f in functions if f not in settings]
        checks = f" (settings checks: {', '.join(settings)})" if settings else ""
        print(f"{switch}: {len(outside)} function(s): {', '.join(outside)}{checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
