"""Tests for jaxft.data.host_augment: TrivialAugment, RandAugment and colour jitter on the host."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from jaxft.data import host_augment as ha, host_transforms as ht, stream


def _image(seed: int = 0, size: int = 24) -> np.ndarray:
  rng = np.random.default_rng(seed)
  base = np.linspace(30, 220, size, dtype=np.float64)
  px = base[None, :, None] * np.array([1.0, 0.7, 0.4]) + rng.normal(0, 8, (size, size, 3))
  return np.clip(px, 0, 255).astype(np.uint8)


def test_every_op_at_zero_magnitude_is_the_identity_and_at_full_changes_the_image():
  im = Image.fromarray(_image())
  ref = np.asarray(im)
  for name, (op, wide, ra, _) in ha.OPS.items():
    if name in ("autocontrast", "equalize", "identity"):
      continue  # no magnitude
    np.testing.assert_array_equal(np.asarray(op(im, 0.0)), ref, err_msg=name)
    assert np.abs(np.asarray(op(im, wide)).astype(int) - ref).mean() > 1.0, name
    assert np.abs(np.asarray(op(im, ra)).astype(int) - ref).mean() > 0.5, name


def test_trivial_augment_draws_ops_and_magnitudes_uniformly(monkeypatch):
  seen = collections.Counter()
  fractions = []

  def record(im, name, fraction, wide, rng):
    seen[name] += 1
    fractions.append(fraction)
    assert wide
    return im

  monkeypatch.setattr(ha, "_apply", record)
  rng = np.random.default_rng(0)
  im = Image.fromarray(_image())
  for _ in range(2800):
    ha.trivial_augment(im, rng)
  assert set(seen) == set(ha.OPS) and min(seen.values()) > 140 and max(seen.values()) < 260
  assert min(fractions) == 0.0 and max(fractions) == 1.0 and len(set(fractions)) == ha.MAGNITUDE_BINS


def test_rand_augment_applies_num_ops_at_the_magnitude(monkeypatch):
  calls = []
  monkeypatch.setattr(ha, "_apply", lambda im, name, f, wide, rng: calls.append((f, wide)) or im)
  ha.rand_augment(Image.fromarray(_image()), np.random.default_rng(0), num_ops=3, magnitude=12)
  assert calls == [(12 / 30, False)] * 3


def test_color_jitter_scales_brightness_within_the_strength():
  grey = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))  # contrast and saturation leave it alone
  means = [np.asarray(ha.color_jitter(grey, np.random.default_rng(s), 0.4)).mean() / 100
           for s in range(300)]
  assert 0.6 - 0.011 <= min(means) < 0.65 and 1.35 < max(means) <= 1.4 + 0.011
  assert ha.color_jitter(grey, np.random.default_rng(0), 0.0) is grey


def test_policies_are_deterministic_per_seed_and_change_the_stream(tmp_path):
  px = _image(size=40)
  for policy in ("trivial", "randaugment"):
    a = ht.train_transform(px, np.random.default_rng(5), 16, policy=policy, jitter=0.3)
    b = ht.train_transform(px, np.random.default_rng(5), 16, policy=policy, jitter=0.3)
    np.testing.assert_array_equal(a, b)
  plain = [ht.train_transform(px, np.random.default_rng(s), 16) for s in range(10)]
  aug = [ht.train_transform(px, np.random.default_rng(s), 16, policy="randaugment", magnitude=20)
         for s in range(10)]
  assert sum(not np.array_equal(p, q) for p, q in zip(plain, aug)) >= 8
  with pytest.raises(ValueError, match="unknown augmentation policy 'auto'"):
    ha.augment(px, np.random.default_rng(0), "auto")
  with pytest.raises(stream.DataError, match="augment must be one of"):
    stream.StreamOptions(size=8, augment="auto")
