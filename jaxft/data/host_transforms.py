"""The transfer-learning image transforms that run on the host, on one full-size image at a time:
random-resized crop + flip for training, resize-shorter-side + centre crop (``crop_pct``) for evaluation.

They run where the image is decoded (in :mod:`jaxft.data.stream`'s worker processes) because they need
the image at its own size and aspect ratio, which a fixed-size device batch has already lost. Each crop
is a box in the original image's coordinates, resampled once by pillow (``Image.resize(box=...)``,
antialiased bilinear), and a JPEG is decoded at the smallest DCT scale (pillow's ``draft``) that still
gives the box at least the output size, so a 4000 px photo is never decoded at full size for a 224 px
crop.

All randomness comes from the ``numpy.random.Generator`` the caller passes (seeded per
``(seed, step, example)`` by the stream), so a transform is a pure function of the file and that seed.
This module imports only numpy and pillow. Nothing here mutates its inputs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from jaxft.data import decode, host_augment

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, pillow's convention
# A file or encoded bytes to decode, or an already decoded uint8 [H, W, 3].
ImageInput = Union[str, Path, bytes, np.ndarray]

# torchvision's / timm's defaults for ImageNet-style transfer.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_CROP_PCT = 0.875
_ATTEMPTS = 10  # draws of (area, ratio) before falling back to the centre crop (as torchvision)


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = DEFAULT_SCALE,
                            ratio: tuple[float, float] = DEFAULT_RATIO) -> Box:
  """A random box covering a ``scale`` fraction of the image area with aspect ratio (w / h) in
  ``ratio``: the area fraction is drawn uniformly, the ratio log-uniformly, up to ten times until the box
  fits; otherwise the largest centred box whose ratio is clamped into ``ratio``.

  Returns:
    ``(left, top, right, bottom)`` in integer pixels, inside the image. ``rng`` advances.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(_ATTEMPTS):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return (left, top, left + w, top + h)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Box:
  """The box that "resize the shorter side to ``floor(size / crop_pct)``, then centre-crop ``size`` x
  ``size``" (timm's eval transform) takes from a ``width`` x ``height`` image, in its coordinates:
  a centred square of side ``size * shorter / floor(size / crop_pct)`` (fractional: resampled once).

  Returns:
    ``(left, top, right, bottom)`` as floats.
  """
  side = size * min(width, height) / math.floor(size / crop_pct)
  left, top = (width - side) / 2.0, (height - side) / 2.0
  return (left, top, left + side, top + side)


def _open(image: ImageInput) -> Image.Image:
  if isinstance(image, np.ndarray):
    return Image.fromarray(image)
  if isinstance(image, bytes):  # an encoded image held in memory (an ArrayRecord record)
    return Image.open(io.BytesIO(image))
  return Image.open(image)


def _crop_resize(im: Image.Image, box: Box, size: int, draft: bool) -> np.ndarray:
  """``box`` of ``im`` (in ``im.size`` coordinates) resampled to ``uint8 [size, size, 3]``."""
  if draft and im.format == "JPEG":
    # The DCT scale (1, 1/2, 1/4, 1/8) pillow picks keeps at least this many pixels across the box.
    want = (math.ceil(im.size[0] * size / max(box[2] - box[0], 1e-9)),
            math.ceil(im.size[1] * size / max(box[3] - box[1], 1e-9)))
    full = im.size
    im.draft("RGB", (min(want[0], full[0]), min(want[1], full[1])))
    fx, fy = im.size[0] / full[0], im.size[1] / full[1]
    box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
  rgb = decode.to_rgb(im)
  return np.asarray(rgb.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)


def train_transform(image: ImageInput, rng: np.random.Generator, size: int,
                    scale: tuple[float, float] = DEFAULT_SCALE,
                    ratio: tuple[float, float] = DEFAULT_RATIO, flip: bool = True,
                    draft: bool = True, policy: str = "none", num_ops: int = 2, magnitude: int = 9,
                    jitter: float = 0.0) -> np.ndarray:
  """Random-resized crop (:func:`random_resized_crop_box`) to ``size`` x ``size``, then a horizontal flip
  with probability 1/2 when ``flip``, then colour ``jitter`` and the augmentation ``policy``
  (:func:`jaxft.data.host_augment.augment`: ``none``, ``trivial``, ``randaugment`` with ``num_ops`` at
  ``magnitude``); any pillow mode is converted to RGB (:func:`decode.to_rgb`).

  Returns:
    A new ``uint8 [size, size, 3]``. ``image`` is not modified; ``rng`` advances.

  Raises:
    OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError: not a readable image.
  """
  with _open(image) as im:
    width, height = im.size
    box = random_resized_crop_box(rng, width, height, scale, ratio)
    out = _crop_resize(im, box, size, draft)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  out = np.ascontiguousarray(out)
  return host_augment.augment(out, rng, policy, num_ops=num_ops, magnitude=magnitude, jitter=jitter)


def eval_transform(image: ImageInput, size: int, crop_pct: float = DEFAULT_CROP_PCT,
                   draft: bool = True) -> np.ndarray:
  """Resize the shorter side to ``floor(size / crop_pct)`` and centre-crop ``size`` x ``size``
  (:func:`center_crop_box`, one resampling), converted to RGB.

  Returns:
    A new ``uint8 [size, size, 3]``; ``image`` is not modified.

  Raises:
    OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError: not a readable image.
  """
  with _open(image) as im:
    width, height = im.size
    return _crop_resize(im, center_crop_box(width, height, size, crop_pct), size, draft)
