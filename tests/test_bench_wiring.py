"""`make bench` runs every section it offers: each `--only` choice of bench/run.py has its branch."""

from __future__ import annotations

import ast
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def _choices(tree: ast.Module) -> list[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and any(k.arg == "choices" for k in node.keywords):
            [choices] = [k.value for k in node.keywords if k.arg == "choices"]
            if isinstance(choices, ast.Name):  # a module-level constant: its list
                [choices] = [
                    assign.value
                    for assign in tree.body
                    if isinstance(assign, ast.Assign)
                    and any(isinstance(target, ast.Name) and target.id == choices.id for target in assign.targets)
                ]
            assert isinstance(choices, ast.List | ast.Tuple)
            return [c.value for c in choices.elts if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    raise AssertionError("no --only choices in bench/run.py")


def _branches(tree: ast.Module) -> set[str]:
    """The section names tested as `"name" in only`, and the figures keys they fill."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.ops[0], ast.In)
            and isinstance(node.comparators[0], ast.Name)
            and node.comparators[0].id == "only"
        ):
            found.add(node.left.value)
    return found


def _figure_keys(tree: ast.Module) -> list[object]:
    keys: list[object] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "figures"
                ):
                    keys.append(ast.literal_eval(target.slice))
    return keys


def test_every_bench_section_has_its_branch_and_its_own_figures() -> None:
    tree = ast.parse(RUN.read_text())
    choices = _choices(tree)
    assert len(choices) >= 9
    assert set(choices) <= _branches(tree)
    keys = _figure_keys(tree)
    assert all(isinstance(key, str) for key in keys), keys  # one section, one key
    assert set(choices) - {"yardsticks"} <= set(keys) | {"scale"}
