"""House rules that a reading of the code would otherwise have to re-check by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import slap_ray

PACKAGE = Path(slap_ray.__file__).parent
MAX_FUNCTION_LINES = 80


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_in_the_package_is_longer_than_80_lines():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30  # the whole package is read, not an empty glob
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for path in modules
        for node in functions(ast.parse(path.read_text(encoding="utf-8")))
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_length_rule_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (node,) = functions(ast.parse(f"def long():\n{body}\n"))
    assert node.end_lineno - node.lineno + 1 == MAX_FUNCTION_LINES + 1
