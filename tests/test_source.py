"""Habits of the sources that a reader relies on: short functions, or a reason where one is long."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The most lines a function may span (signature and docstring included) without a reason.
LIMIT = 60
#: The sentence that gives the reason, in the long function's docstring.
REASON = "Over 60 lines"


def test_no_function_over_60_lines_without_a_reason_in_its_docstring():
    long = []
    for path in sorted([*ROOT.joinpath("snopt").rglob("*.py"), *ROOT.joinpath("search").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                where = f"{path.relative_to(ROOT)}:{node.name}"
                if span > LIMIT and REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{where} ({span} lines)")
    assert not long, long
