"""The CPU backend (scaffold: the redesign moves every CPU-specific piece here).

``enable()`` is the one explicit switch; ``network_layers()`` returns the layers a ``Network`` should use.
"""

from __future__ import annotations

from jaxft.models.layers import Layers


def enable(*, relaunch: bool = False) -> None:
  """Switches the process-wide CPU speed-ups on; ``relaunch`` (CLIs only) may re-exec under tcmalloc."""
  del relaunch


def network_layers() -> Layers:
  """Returns the layer implementations for ``Network(layers=...)`` on this process's backend."""
  return Layers()


def status() -> str:
  """Returns one line saying which CPU kernels are in use."""
  from jaxft.models import onednn  # pylint: disable=g-import-not-at-top
  return onednn.status()
