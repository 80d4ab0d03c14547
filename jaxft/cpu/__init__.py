"""The CPU backend (scaffold: the redesign moves every CPU-specific piece here).

``enable()`` is the one explicit switch; ``network_layers()`` returns the layers a ``Network`` should use.
"""

from __future__ import annotations

from jaxft.models.layers import Layers


def enable() -> None:
  """Switches the process-wide CPU speed-ups on (scaffold: today's behaviour)."""


def network_layers() -> Layers:
  """Returns the layer implementations for ``Network(layers=...)`` on this process's backend."""
  return Layers()
