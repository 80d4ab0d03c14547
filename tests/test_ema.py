"""The exponential moving average of weights."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import ema as ema_lib


def test_ema_math():
  ema = {"w": jnp.array([1.0, 2.0])}
  new = {"w": jnp.array([3.0, 0.0])}
  np.testing.assert_allclose(optax.incremental_update(new, ema, 1 - 0.75)["w"], [1.5, 1.5], rtol=1e-6)
  np.testing.assert_allclose(ema["w"], [1.0, 2.0])  # not mutated
  assert float(ema_lib.ema_decay(0, 0.999)) == pytest.approx(0.1)
  assert float(ema_lib.ema_decay(90, 0.5)) == pytest.approx(0.5)
  assert float(ema_lib.ema_decay(0, 0.999, warmup=False)) == pytest.approx(0.999)
  # A run of updates equals the closed-form recurrence.
  e, ws = 0.0, [1.0, 4.0, -2.0]
  tree = {"w": jnp.zeros(())}
  for s, w in enumerate(ws):
    d = min(0.9, (1 + s) / (10 + s))
    e = d * e + (1 - d) * w
    tree = optax.incremental_update({"w": jnp.asarray(w)}, tree, 1 - ema_lib.ema_decay(s, 0.9))
  assert float(tree["w"]) == pytest.approx(e, rel=1e-6)
