#!/usr/bin/env python3
"""How far a switch reaches into train_gpt.py: the functions outside Hyperparameters that read its value, by
qualified name, following the value where it is renamed: stored under another attribute (self.varlen = ...h.x...)
or a local name, passed as an argument (keyword or by position to a function of the file) and read under the
parameter's name. Hyperparameters' own reads (the env read, cross-checks of settings) are listed apart. A switch is read once and
dispatched once (the house style): its reach should stay small. Only copies are followed (a value chosen by the
switch is its dispatch); an attribute of the same name elsewhere counts too: the count is an upper bound.

    python3 tools/switch_reach.py                       # DOC_ISOLATION, NUM_LOOPS, TTT_MODE, NGRAM_TILT
    python3 tools/switch_reach.py COMPRESSOR QUANT
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "train_gpt.py"
DEFAULT_SWITCHES = ("DOC_ISOLATION", "NUM_LOOPS", "TTT_MODE", "NGRAM_TILT")


def functions_of(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Every function and method by qualified name (Class.method), outermost only."""
    found = {}

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[prefix + child.name] = child

    visit(tree, "")
    return found


def parameter_names(function: ast.FunctionDef) -> list[str]:
    return [a.arg for a in function.args.posonlyargs + function.args.args + function.args.kwonlyargs]


class Carriers:
    """The attribute names and (function, parameter) pairs that hold the switch's value."""

    def __init__(self, attribute: str):
        self.attributes, self.parameters = {attribute}, set()

    def read_by(self, node, function_name: str) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Load) and sub.attr in self.attributes:
                return True
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                if (function_name, sub.id) in self.parameters:
                    return True
        return False


def copies(node, carriers: Carriers, function_name: str) -> bool:
    """Whether node is the value itself: a read of a carrier, or getattr(obj, "<carrier>", ...). A value computed
    from it (x if h.switch else y) is its dispatch, not a copy: not followed."""
    if isinstance(node, ast.Attribute):
        return node.attr in carriers.attributes
    if isinstance(node, ast.Name):
        return (function_name, node.id) in carriers.parameters
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
        return isinstance(node.args[1], ast.Constant) and node.args[1].value in carriers.attributes
    return False


def spread(carriers: Carriers, functions: dict[str, ast.FunctionDef]) -> bool:
    """One pass: attributes and locals assigned a copy, parameters called with one. True when anything was added."""
    by_short_name = {name.split(".")[-1]: (name, f) for name, f in functions.items()}
    for name, function in functions.items():  # a class called builds through its __init__
        if name.endswith(".__init__"):
            by_short_name[name.split(".")[-2]] = (name, function)
    before = (len(carriers.attributes), len(carriers.parameters))
    for name, function in functions.items():
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and copies(node.value, carriers, name):
                for target in node.targets:
                    if isinstance(target, ast.Attribute):
                        carriers.attributes.add(target.attr)
                    elif isinstance(target, ast.Name):  # a local renamed copy
                        carriers.parameters.add((name, target.id))
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            target_name, target = by_short_name.get(callee, (None, None))
            if target is None:
                continue
            params = [p for p in parameter_names(target) if p != "self"]
            for index, argument in enumerate(node.args):
                if index < len(params) and copies(argument, carriers, name):
                    carriers.parameters.add((target_name, params[index]))
            for keyword in node.keywords:
                if keyword.arg and copies(keyword.value, carriers, name):
                    carriers.parameters.add((target_name, keyword.arg))
    return (len(carriers.attributes), len(carriers.parameters)) != before


def reach(source: str, switch: str) -> list[str]:
    """Qualified names of the functions that read the switch's value under any name that carries it."""
    functions = functions_of(ast.parse(source))
    carriers = Carriers(switch.lower())
    while spread(carriers, functions):
        pass
    return [name for name, function in functions.items() if carriers.read_by(function, name)]


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
