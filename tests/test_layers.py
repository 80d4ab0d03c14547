"""The plain layers' ReLU (jaxft.models.layers.relu): flax's values and derivatives, with the
derivative read off the output so that XLA can compute ``relu(h + shortcut)`` in one pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import layers


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_matches_flax_in_value_gradient_and_jvp(dtype):
  r = np.random.default_rng(0)
  x = jnp.asarray(np.concatenate([r.normal(size=50), [0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf]]),
                  dtype)
  ct = jnp.asarray(r.normal(size=x.shape), dtype)
  np.testing.assert_array_equal(layers.relu(x), nn.relu(x))
  for f in (lambda x: layers.relu(x), lambda x: nn.relu(x)):
    assert jax.vjp(f, x)[1](ct)[0].dtype == dtype
  np.testing.assert_array_equal(jax.vjp(layers.relu, x)[1](ct)[0], jax.vjp(nn.relu, x)[1](ct)[0])
  # Forward mode works too (a custom_jvp, not a custom_vjp), as do second derivatives.
  np.testing.assert_array_equal(jax.jvp(layers.relu, (x,), (ct,))[1], jax.jvp(nn.relu, (x,), (ct,))[1])
  g2 = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(layers.relu(x) ** 2))(x)))(
      x.astype(jnp.float32))
  assert np.all(np.isfinite(g2[np.isfinite(np.asarray(x, np.float32))]))


def test_relu_is_the_registered_activation():
  assert layers.activation("relu") is layers.relu
