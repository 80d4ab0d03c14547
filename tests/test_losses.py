"""Loss terms on tiny known inputs; expected values computed here by hand or numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import losses


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_one_hot_targets_with_smoothing():
  t = losses.one_hot_targets(jnp.array([2, 0]), 4, smoothing=0.2)
  np.testing.assert_allclose(t, [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]], rtol=1e-6)
  np.testing.assert_allclose(np.sum(t, -1), [1.0, 1.0], rtol=1e-6)


def test_soft_cross_entropy_value():
  logits = np.array([[0.0, math.log(3.0)], [1.0, 1.0]], np.float32)
  targets = np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)
  # row 0: p = (1/4, 3/4) → -log(3/4); row 1: uniform → log 2.
  expected = (-math.log(0.75) + math.log(2.0)) / 2
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, targets), expected, rtol=1e-6)


def test_distillation_kl_value_and_temperature_scaling():
  s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], np.float32)
  t = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], np.float32)
  for temp in (1.0, 4.0):
    lt, ls = _log_softmax(t / temp), _log_softmax(s / temp)
    expected = temp ** 2 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
    np.testing.assert_allclose(losses.distillation_kl(s, t, temp), expected, rtol=1e-5)
  assert float(losses.distillation_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)
  # The teacher side receives no gradient.
  g = jax.grad(lambda tt: losses.distillation_kl(jnp.asarray(s), tt, 2.0))(jnp.asarray(t))
  np.testing.assert_array_equal(g, np.zeros_like(t))


def test_feature_terms_values():
  a = np.array([[1.0, 2.0], [0.0, 1.0]], np.float32)
  b = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  np.testing.assert_allclose(losses.feature_mse(a, b), (0 + 4 + 1 + 0) / 4, rtol=1e-6)

  def gram(f):
    g = f @ f.T
    return g / np.linalg.norm(g, axis=-1, keepdims=True)

  wide = np.array([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]], np.float32)  # another width
  expected = np.sum((gram(a) - gram(wide)) ** 2) / 4
  np.testing.assert_allclose(losses.similarity_loss(a, wide), expected, rtol=1e-5)
  assert float(losses.similarity_loss(a, 3.0 * a)) == pytest.approx(0.0, abs=1e-7)


def test_fixed_projection_is_orthonormal_and_deterministic():
  p = losses.fixed_projection(8, 3, seed=1)
  assert p.shape == (8, 3)
  np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
  np.testing.assert_array_equal(p, losses.fixed_projection(8, 3, seed=1))
  assert losses.fixed_projection(3, 8).shape == (3, 8)
