"""The core stays readable: no function in rkllm_core is longer than 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import rkllm_core

LIMIT = 60


def test_no_function_in_the_core_is_longer_than_60_lines() -> None:
    root = Path(rkllm_core.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > LIMIT:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these into named steps: " + "; ".join(long)
