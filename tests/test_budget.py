"""The style rules as tests: no function over 60 lines, sections in data-flow order (no name used before its section),
Main short, the model's call contract named, the README's map current (no line budget: size follows from clarity)."""

from __future__ import annotations

import ast
import re
import sys

from conftest import REPO

SOURCE = (REPO / "train_gpt.py").read_text(encoding="utf-8")
sys.path.insert(0, str(REPO / "tools"))
import file_map  # noqa: E402


def test_no_function_is_longer_than_60_lines():
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(SOURCE))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"functions over 60 lines: {long}"


def top_level_names(tree: ast.Module) -> dict[str, int]:
    """Each module-level name (functions, classes, assigned constants) and the line that defines it."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    names[name.id] = node.lineno
    names.pop("_", None)  # the custom ops' fakes, registered by decorator, never referred to
    return names


def test_no_section_uses_a_name_of_a_later_section():
    """Data flows down the file: a name lives in the section its data belongs to, and no earlier section uses it
    (annotations count). Before this rule RunContext sat in Main, taken by functions of every section above it."""
    tree = ast.parse(SOURCE)
    sections = file_map.sections(SOURCE)
    index = lambda line: next(i for i, (_, a, b) in enumerate(sections) if a <= line <= b)  # noqa: E731
    defined = top_level_names(tree)
    early = set()
    for node in tree.body:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in defined}
        quoted = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        used |= {name for name in quoted if name in defined and not name.isupper()}  # "PassScore", not env names
        for name in used:
            if index(defined[name]) > index(node.lineno):
                early.add((getattr(node, "name", node.lineno), name, sections[index(defined[name])][0]))
    assert not early, f"names used above their section: {sorted(early, key=str)}"


def test_sections_are_in_data_flow_order_and_main_only_orchestrates():
    names = [name for name, _, _ in file_map.sections(SOURCE)]
    assert names == [
        "Hyperparameters",
        "Data",
        "Model",
        "Optimizer",
        "Weight averaging",
        "Training",
        "Quantize and pack",
        "Evaluate",
        "Main",
    ]
    _, first, last = file_map.sections(SOURCE)[-1]
    assert last - first + 1 < 200, f"Main is {last - first + 1} lines"


def test_the_models_inputs_are_named():
    """Boundaries, rotary tables and layer weights travel as named values, not in each other's lists or by slot."""
    for pattern in (
        r"\brotary\[",
        r"\bweights\[",
        r"slot == 4",
        r"hessian_recorder",
        r"model\.lora\b",
        r"\.rope_length",
    ):
        assert not re.search(pattern, SOURCE), pattern
    attention = ast.get_source_segment(
        SOURCE,
        next(
            node
            for node in ast.walk(ast.parse(SOURCE))
            if isinstance(node, ast.FunctionDef)
            and node.name == "forward"
            and "boundaries" in [a.arg for a in node.args.args]
            and "weights" in [a.arg for a in node.args.args]
            and "x0" not in [a.arg for a in node.args.args]
        ),
    )
    assert "self.attention(q, k, v, boundaries)" in attention


def test_the_readmes_map_of_the_file_is_current():
    """README's map names every section of train_gpt.py in order (no line numbers: edits don't break it)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| section | what is in it |") :]
    rows = re.findall(r"^\| ([A-Z][\w ]+) \| ", table, re.M)
    assert rows == [name for name, _, _ in file_map.sections(SOURCE)]
