"""Photometric and geometric augmentation policies on the host, on one cropped image at a time:
TrivialAugment (wide), RandAugment and colour jitter, all with pillow's own operations.

:mod:`jaxft.data.host_transforms` calls them after the random-resized crop and flip, with the same
``numpy.random.Generator`` (seeded per ``(seed, step, example)``), so an augmented example is a pure
function of its file and that seed. The magnitudes follow the published policies (TrivialAugment's
"wide" ranges, RandAugment's over 31 magnitude bins, as torchvision implements them); emptied pixels of
a geometric op are mid-grey. This module imports only numpy and pillow; nothing mutates its inputs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

POLICIES = ("none", "trivial", "randaugment")
MAGNITUDE_BINS = 31  # magnitudes 0 … 30
FILL = (128, 128, 128)

# name → (op(image, value), the value at full magnitude for TrivialAugment-wide / for RandAugment,
# whether the value takes a random sign). Translation is a fraction of the image side.
_Op = Callable[[Image.Image, float], Image.Image]


def _affine(im: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
  return im.transform(im.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=FILL)


def _enhance(kind: type) -> _Op:
  return lambda im, v: kind(im).enhance(1.0 + v)


OPS: dict[str, tuple[_Op, float, float, bool]] = {
    "identity": (lambda im, v: im, 0.0, 0.0, False),
    "shear_x": (lambda im, v: _affine(im, (1, v, 0, 0, 1, 0)), 0.99, 0.3, True),
    "shear_y": (lambda im, v: _affine(im, (1, 0, 0, v, 1, 0)), 0.99, 0.3, True),
    "translate_x": (lambda im, v: _affine(im, (1, 0, v * im.size[0], 0, 1, 0)), 32 / 224, 150 / 331, True),
    "translate_y": (lambda im, v: _affine(im, (1, 0, 0, 0, 1, v * im.size[1])), 32 / 224, 150 / 331, True),
    "rotate": (lambda im, v: im.rotate(v, Image.BILINEAR, fillcolor=FILL), 135.0, 30.0, True),
    "brightness": (_enhance(ImageEnhance.Brightness), 0.99, 0.9, True),
    "color": (_enhance(ImageEnhance.Color), 0.99, 0.9, True),
    "contrast": (_enhance(ImageEnhance.Contrast), 0.99, 0.9, True),
    "sharpness": (_enhance(ImageEnhance.Sharpness), 0.99, 0.9, True),
    # value = bits removed (8 - kept), threshold lowered from 255
    "posterize": (lambda im, v: ImageOps.posterize(im, 8 - int(round(v))), 6.0, 4.0, False),
    "solarize": (lambda im, v: ImageOps.solarize(im, int(round(255 - v))), 255.0, 255.0, False),
    "autocontrast": (lambda im, v: ImageOps.autocontrast(im), 0.0, 0.0, False),
    "equalize": (lambda im, v: ImageOps.equalize(im), 0.0, 0.0, False),
}
_NAMES = tuple(OPS)


def _apply(im: Image.Image, name: str, fraction: float, wide: bool, rng: np.random.Generator
           ) -> Image.Image:
  op, wide_max, ra_max, signed = OPS[name]
  value = fraction * (wide_max if wide else ra_max)
  if signed and rng.random() < 0.5:
    value = -value
  return op(im, value)


def trivial_augment(im: Image.Image, rng: np.random.Generator) -> Image.Image:
  """TrivialAugment (wide): one op drawn uniformly, at a magnitude drawn uniformly from the 31 bins.

  Returns:
    A new RGB image of the same size (``im`` itself for the identity); ``rng`` advances.
  """
  name = _NAMES[int(rng.integers(len(_NAMES)))]
  fraction = int(rng.integers(MAGNITUDE_BINS)) / (MAGNITUDE_BINS - 1)
  return _apply(im, name, fraction, True, rng)


def rand_augment(im: Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: int = 9
                 ) -> Image.Image:
  """RandAugment: ``num_ops`` ops drawn uniformly (with replacement), each at ``magnitude`` of 30.

  Returns:
    A new RGB image of the same size (or ``im`` when every op is the identity); ``rng`` advances.
  """
  for _ in range(num_ops):
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    im = _apply(im, name, magnitude / (MAGNITUDE_BINS - 1), False, rng)
  return im


def color_jitter(im: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
  """Brightness, contrast and saturation, each scaled by a factor drawn from ``[1 - s, 1 + s]``, in a
  random order (``s = strength``; no hue shift).

  Returns:
    A new RGB image (``im`` when ``strength`` is 0); ``rng`` advances only when ``strength > 0``.
  """
  if strength <= 0:
    return im
  kinds = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  for i in rng.permutation(3):
    im = kinds[i](im).enhance(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
  return im


def augment(pixels: np.ndarray, rng: np.random.Generator, policy: str, *, num_ops: int = 2,
            magnitude: int = 9, jitter: float = 0.0) -> np.ndarray:
  """Colour jitter (when ``jitter``), then ``policy`` (one of :data:`POLICIES`) on ``uint8 [H, W, 3]``.

  Returns:
    ``pixels`` itself when nothing applies, else a new ``uint8 [H, W, 3]``.

  Raises:
    ValueError: an unknown policy.
  """
  if policy not in POLICIES:
    raise ValueError(f"unknown augmentation policy {policy!r}; valid: {', '.join(POLICIES)}")
  if policy == "none" and jitter <= 0:
    return pixels
  im = color_jitter(Image.fromarray(pixels), rng, jitter)
  if policy == "trivial":
    im = trivial_augment(im, rng)
  elif policy == "randaugment":
    im = rand_augment(im, rng, num_ops, magnitude)
  return np.asarray(im, dtype=np.uint8)
