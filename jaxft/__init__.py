"""jaxft: fine-tune pretrained vision models in JAX/Flax; evolve their structure with pure transforms.

Importing jaxft changes nothing in the process (no environment variable, allocator setting or native
build) and loads nothing heavy: the names below are imported on first access (PEP 562). The CPU
speed-ups are one explicit call, :func:`jaxft.cpu.enable`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → the module it lives in (imported when the name is first used)
_EXPORTS = {
    "Model": "jaxft.models", "ModelSpec": "jaxft.models", "Network": "jaxft.models",
    "create_model": "jaxft.models", "get_spec": "jaxft.models", "list_archs": "jaxft.models",
    "load_model": "jaxft.checkpoint", "load_pretrained": "jaxft.checkpoint",
    "save_model": "jaxft.checkpoint", "convert_file": "jaxft.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
  if not name.startswith("_"):  # a submodule (`jaxft.models` after a bare `import jaxft`)
    try:
      return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
