"""The shape of the code itself: short functions (docs/architecture.md promises ≤ 80 lines each)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxft"
MAX_FUNCTION_LINES = 80


def _functions(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _long_functions(source: str, limit: int) -> list[tuple[str, int, int]]:
  """(name, first line, length) of every function in ``source`` longer than ``limit`` lines."""
  return [(f.name, f.lineno, f.end_lineno - f.lineno + 1) for f in _functions(ast.parse(source))
          if f.end_lineno - f.lineno + 1 > limit]


def test_the_check_finds_a_long_function():
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
  assert _long_functions(f"def f():\n{body}\n", MAX_FUNCTION_LINES) == [("f", 1, MAX_FUNCTION_LINES + 1)]
  assert _long_functions("def g():\n  return 1\n", MAX_FUNCTION_LINES) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_80_lines(path: Path):
  assert _long_functions(path.read_text(), MAX_FUNCTION_LINES) == []


def test_architecture_page_names_every_module():
  # docs/architecture.md is the map a newcomer reads first: a module missing from it is a stale map.
  page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
  def named(p: Path) -> bool:  # top-level modules by file name, package modules as `pkg/mod.py` or in its row
    rel = p.relative_to(PACKAGE)
    if len(rel.parts) == 1:
      return f"`{rel.name}`" in page
    row = next((line for line in page.splitlines() if line.startswith(f"| **`{rel.parts[0]}/`**")), None)
    return str(rel) in page or (row is not None and _package_row_names(page, rel.parts[0], rel.name))

  missing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if p.name not in ("__init__.py", "__main__.py") and not named(p))
  assert missing == []


def _package_row_names(page: str, package: str, name: str) -> bool:
  """Whether ``name`` appears in the table rows that follow the ``**`package/`**`` row of the module map."""
  lines = page.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"| **`{package}/`**"))
  for line in lines[start + 1:]:
    if not line.startswith("|") or line.startswith("| **"):
      return False
    if f"`{name}`" in line:
      return True
  return False
