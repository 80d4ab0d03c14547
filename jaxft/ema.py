"""Exponential moving average of weights (params and BatchNorm statistics): the decay schedule.

The update itself is optax's: ``optax.incremental_update(new, ema, 1 - decay)`` returns
``(1 - decay) · new + decay · ema`` leaf by leaf (a new tree; neither input is mutated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


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
