"""On-device batch transforms: mixup, cutmix, random erasing."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import losses
from jaxft.data import transforms


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
