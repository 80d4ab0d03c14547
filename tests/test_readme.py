"""Every ```python snippet of README.md runs as written (paths to ../shared resolved to the real one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
  assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int, tmp_path: Path):
  code = SNIPPETS[index]
  if "../shared" in code:
    if not SHARED.is_dir():
      pytest.skip("snippet reads ../shared")
    code = code.replace("../shared", str(SHARED))
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                     timeout=600, env={**os.environ, "JAXFT_CACHE_DIR": str(tmp_path / "cache")})
  assert r.returncode == 0, f"README snippet {index} failed:\n{code}\n{r.stderr[-3000:]}"
