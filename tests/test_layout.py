"""Issue 16's size limits: no package module over 500 lines, no function over 80.

A function's length is from its ``def`` line to its last line, its docstring
aside.  Run as a script (``python tests/test_layout.py``) to list every
offender at once.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nvmri_bluesky"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def offenders() -> Iterator[str]:
    """``path: N lines`` per long module, ``path:line name: N lines`` per long function."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parent)
        if (n := text.count("\n")) > MAX_MODULE_LINES:
            yield f"{where}: {n} lines (module)"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and (n := _function_lines(node)) > MAX_FUNCTION_LINES:
                yield f"{where}:{node.lineno} {node.name}: {n} lines (function)"


def test_no_module_or_function_over_the_limits() -> None:
    assert list(offenders()) == []


if __name__ == "__main__":
    print("\n".join(offenders()) or "none")
