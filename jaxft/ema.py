"""Exponential moving average of weights (params and BatchNorm statistics)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Tree = Any



def ema_decay(step: Array | int, decay: float, warmup: bool = True) -> Array:
  """The decay used at optimizer step ``step`` (0-based).

  With ``warmup``, ``min(decay, (1 + step) / (10 + step))`` (as TensorFlow's ExponentialMovingAverage
  with ``num_updates``), so that an average started at fine-tuning time is not dominated by the
  pretrained weights for the first ``~1 / (1 - decay)`` steps; else ``decay``.
  """
  d = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return d
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum(d, (1.0 + s) / (10.0 + s))


def ema_update(ema: Tree, new: Tree, decay: Array | float) -> Tree:
  """Returns ``decay · ema + (1 - decay) · new`` leaf by leaf (a new tree; neither input is mutated)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, new)
