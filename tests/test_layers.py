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


@pytest.mark.parametrize("relu,reads_output", [(layers.relu, True), (nn.relu, False)])
def test_relu_mask_is_computed_from_the_output(relu, reads_output):
  # What lets XLA fuse a residual add with its ReLU: in the gradient, the mask's comparison reads the
  # ReLU's output, not the sum (flax's reads the sum, which must then stay alive).
  jaxpr = jax.make_jaxpr(jax.grad(lambda h, s: jnp.sum(relu(h + s))))(jnp.ones(4), jnp.ones(4)).jaxpr
  producer = {v: eqn.primitive.name for eqn in jaxpr.eqns for v in eqn.outvars}
  (mask,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "gt"]
  assert (producer[mask.invars[0]] == "custom_jvp_call") == reads_output
