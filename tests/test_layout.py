"""Layout rules of issue 14 that no linter checks: functions of about 100 lines at most."""

from __future__ import annotations

import ast
from pathlib import Path

import pmpclean

#: Longest function body (def line to last line, docstring included) without a reason.
MAX_LINES = 100
PACKAGE = Path(pmpclean.__file__).parent


def _long_functions() -> list[tuple[str, int]]:
    """``(module:function, lines)`` of each function over MAX_LINES lines with no
    ``# long: <reason>`` comment in its head: the signature or the comment lines between
    it and the first statement (the docstring)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length <= MAX_LINES:
                continue
            # from the def line to the first statement (signatures span several lines)
            head = lines[node.lineno - 1 : node.body[0].lineno - 1]
            if any("# long:" in line and line.split("# long:", 1)[1].strip() for line in head):
                continue
            found.append((f"{path.relative_to(PACKAGE.parent)}:{node.name}", length))
    return found


def test_functions_are_short_or_say_why() -> None:
    long = _long_functions()
    assert not long, (
        f"functions over {MAX_LINES} lines without a '# long: <reason>' comment on their "
        "def: " + ", ".join(f"{name} ({n} lines)" for name, n in long)
    )
