"""Loss terms, mixing and EMA on tiny known inputs; expected values computed here by hand or numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import ema as ema_lib
from jaxft import losses
from jaxft.data import transforms


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


def test_mixup_targets_sum_to_one_and_mix_images_linearly():
  rng = jax.random.key(0)
  x = jax.random.uniform(jax.random.key(1), (4, 5, 5, 3))
  mixed, lam = transforms.mix_batch(rng, x, mixup_alpha=0.4)
  assert 0.0 <= float(lam) <= 1.0
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-6)
  t = transforms.mix_targets(losses.one_hot_targets(jnp.array([0, 1, 2, 1]), 3, 0.1), lam)
  np.testing.assert_allclose(np.sum(t, -1), np.ones(4), rtol=1e-6)
  # Row 0 mixes its own class 0 with row 3's class 1.
  np.testing.assert_allclose(t[0], lam * np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]) +
                             (1 - lam) * np.array([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]), rtol=1e-5)


def test_cutmix_lambda_equals_kept_area_and_targets_sum_to_one():
  x = jnp.arange(2 * 8 * 6 * 1, dtype=jnp.float32).reshape(2, 8, 6, 1)
  seen_partial = False
  for seed in range(8):
    mixed, lam = transforms.mix_batch(jax.random.key(seed), x, cutmix_alpha=1.0)
    pasted = np.asarray(mixed != x)[..., 0]  # pixels that came from the partner
    np.testing.assert_array_equal(pasted[0], pasted[1])  # one box for the whole batch
    assert float(lam) == pytest.approx(1.0 - pasted[0].mean(), abs=1e-6)
    np.testing.assert_array_equal(np.asarray(mixed)[0][pasted[0]], np.asarray(x)[1][pasted[0]])
    t = transforms.mix_targets(losses.one_hot_targets(jnp.array([0, 1]), 2), lam)
    np.testing.assert_allclose(np.sum(t, -1), [1.0, 1.0], rtol=1e-6)
    seen_partial |= 0.0 < float(lam) < 1.0
  assert seen_partial


def test_mix_batch_off_and_prob_zero_leave_images_alone():
  x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
  for kw in ({}, {"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "prob": 0.0}):
    mixed, lam = transforms.mix_batch(jax.random.key(0), x, **kw)
    np.testing.assert_array_equal(mixed, x)
    assert float(lam) == 1.0


def test_random_erasing_fills_one_box_per_erased_example():
  x = jnp.ones((16, 10, 10, 3))
  out = np.asarray(transforms.random_erasing(jax.random.key(0), x, prob=0.5))
  erased = (out == 0).all(-1)
  n_erased = erased.any((1, 2)).sum()
  assert 0 < n_erased < 16
  for e in erased[erased.any((1, 2))]:
    ys, xs = np.nonzero(e)
    assert e.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a solid rectangle
  np.testing.assert_array_equal(transforms.random_erasing(jax.random.key(0), x, prob=0.0), x)


def test_ema_math():
  ema = {"w": jnp.array([1.0, 2.0])}
  new = {"w": jnp.array([3.0, 0.0])}
  np.testing.assert_allclose(ema_lib.ema_update(ema, new, 0.75)["w"], [1.5, 1.5], rtol=1e-6)
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
    tree = ema_lib.ema_update(tree, {"w": jnp.asarray(w)}, ema_lib.ema_decay(s, 0.9))
  assert float(tree["w"]) == pytest.approx(e, rel=1e-6)
