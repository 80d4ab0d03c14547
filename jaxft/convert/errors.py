"""The one error type of weight conversion (every module of :mod:`jaxft.convert` raises it)."""

from __future__ import annotations


class ConversionError(ValueError):
  """Weights that cannot be converted; the message lists every problem at once."""
