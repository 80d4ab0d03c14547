"""Lazy package attributes (PEP 562): a package's public names, imported from their modules on first use.

Written by hand (about twenty lines) rather than taken from ``lazy_loader``: jaxft needs exactly this —
explicit name → module tables, cached after the first look-up — and no stub files or environment
switches, so a dependency would add more than it saves.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def attach(package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
  """Returns ``(__getattr__, __dir__, __all__)`` for ``package``.

  Args:
    package: the package's ``__name__``.
    exports: public name → the module defining it (``.sub`` relative to ``package``, or absolute).
    submodules: submodule names reachable as attributes before anyone imported them.

  The first look-up of a name imports its module and stores the value on the package, so later
  look-ups are ordinary attribute reads. Nothing is mutated but the package's own namespace.
  """
  subs = frozenset(submodules)

  def load(module: str) -> Any:
    return importlib.import_module(package + module if module.startswith(".") else module)

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name in exports:
      value = getattr(load(exports[name]), name)
    elif name in subs:
      value = load("." + name)
    else:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    setattr(sys.modules[package], name, value)
    return value

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted({*vars(sys.modules[package]), *exports, *subs})

  return __getattr__, __dir__, sorted(exports)
