"""On-device image transforms: normalise, crop, flip, resize, mixup, cutmix, random erasing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import data, losses
from jaxft.data import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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


def test_normalize_numerics():
  x = np.array([[[[0, 255, 51]]]], np.uint8)
  out = data.normalize(x, MEAN, STD)
  expected = (np.array([0, 1, 0.2]) - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], expected, rtol=1e-6)
  assert out.dtype == jnp.float32
  assert data.normalize(x, MEAN, STD, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_augment_shapes_dtype_determinism_jit():
  images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (6, 8, 8, 3), dtype=np.uint8))
  rng = jax.random.PRNGKey(0)
  out = data.augment(rng, images, mean=MEAN, std=STD)
  assert out.shape == (6, 8, 8, 3) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, data.augment(rng, images, mean=MEAN, std=STD))
  assert not np.array_equal(out, data.augment(jax.random.PRNGKey(1), images, mean=MEAN, std=STD))
  jitted = jax.jit(lambda r, x: data.augment(r, x, mean=MEAN, std=STD, out_size=12, dtype=jnp.bfloat16))
  big = jitted(rng, images)
  assert big.shape == (6, 12, 12, 3) and big.dtype == jnp.bfloat16
  ev = data.preprocess_eval(images, MEAN, STD, out_size=(4, 6))
  assert ev.shape == (6, 4, 6, 3)
  np.testing.assert_allclose(data.preprocess_eval(images, MEAN, STD), data.normalize(images, MEAN, STD))


def test_augment_flip_really_flips():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 4, 5, 3), dtype=np.uint8))
  rng = jax.random.PRNGKey(3)
  out = np.asarray(data.augment(rng, images, mean=MEAN, std=STD, crop_padding=0))
  plain = np.asarray(data.normalize(images, MEAN, STD))
  flipped = plain[:, :, ::-1]
  same = [np.array_equal(o, p) for o, p in zip(out, plain)]
  mirrored = [np.array_equal(o, f) for o, f in zip(out, flipped)]
  assert all(s != m for s, m in zip(same, mirrored))  # each example exactly one of the two
  assert 16 < sum(mirrored) < 48  # about half, with a fixed key
  # The flip decisions come from the rng's second half, as documented: reproduce them.
  expected = np.asarray(jax.random.bernoulli(jax.random.split(rng)[1], 0.5, (64,)))
  assert mirrored == expected.tolist()
  none = data.augment(rng, images, mean=MEAN, std=STD, crop_padding=0, flip=False)
  np.testing.assert_array_equal(none, plain)


def test_augment_crop_offsets_within_bounds_and_zero_padding():
  n, h, w, p = 200, 6, 6, 2
  images = jnp.full((n, h, w, 3), 200, jnp.uint8)  # no pixel is 0, so padding is recognisable
  out = np.asarray(data.augment(jax.random.PRNGKey(0), images, mean=MEAN, std=STD, crop_padding=p,
                                flip=False))
  pad_value = np.asarray(data.normalize(np.zeros((1, 1, 1, 3), np.uint8), MEAN, STD))[0, 0, 0]
  is_pad = np.all(np.isclose(out, pad_value), axis=-1)  # [n, h, w]
  is_img = np.all(np.isclose(out, np.asarray(data.normalize(images[:1, :1, :1], MEAN, STD))[0, 0, 0]),
                  axis=-1)
  assert (is_pad | is_img).all()
  rows_pad = is_pad.all(axis=2).sum(axis=1)  # padded rows per example
  cols_pad = is_pad.all(axis=1).sum(axis=1)
  assert rows_pad.max() == p and cols_pad.max() == p  # never more than the padding
  assert (rows_pad == 0).any() and (cols_pad == 0).any()
  # Every pixel not in a padded row or column is image: the window is one contiguous shift.
  assert is_pad.sum() == sum(r * w + c * h - r * c for r, c in zip(rows_pad, cols_pad))
  # All 5 x 5 offsets occur across 200 examples.
  top = is_pad[:, 0, :].all(axis=1)
  assert top.any() and is_pad[:, -1, :].all(axis=1).any() and (~top & ~is_pad[:, -1, :].all(axis=1)).any()
