"""Image transforms that run on device inside the jitted train step: random crop and flip, resize and
normalisation (:func:`augment`, :func:`preprocess_eval`, :func:`normalize`), mixup, cutmix and random
erasing. All are pure and jit-compatible; none mutates its input; all randomness comes from the key passed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


# --- crop, flip, resize, normalise --------------------------------------------------------------------


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = jnp.float32) -> jax.Array:
  """``(images / 255 - mean) / std`` per channel, computed in float32 and returned as ``dtype``.

  Args:
    images: ``uint8 [..., C]`` (or float in 0–255); not mutated.
    mean, std: per-channel statistics in 0–1 units (e.g. ImageNet ``(0.485, 0.456, 0.406)``).
    dtype: output dtype.
  """
  x = jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)
  mean_ = jnp.asarray(mean, jnp.float32)
  std_ = jnp.asarray(std, jnp.float32)
  return ((x - mean_) / std_).astype(dtype)


def _resize(x: jax.Array, out_size: int | Sequence[int] | None) -> jax.Array:
  if out_size is None:
    return x
  h, w = _as_hw(out_size)
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear")


def augment(rng: jax.Array, images: jax.Array, *, mean: Sequence[float], std: Sequence[float],
            crop_padding: int = 4, flip: bool = True, out_size: int | Sequence[int] | None = None,
            dtype: Any = jnp.float32) -> jax.Array:
  """Training augmentation on device: per-example random crop and horizontal flip, optional resize,
  then :func:`normalize`.

  The crop pads each image by ``crop_padding`` pixels of value 0 (black, as torchvision's
  ``RandomCrop(padding=…)`` does before normalisation) and cuts an ``H × W`` window at a per-example
  random offset in ``[0, 2 * crop_padding]``. Each example is flipped with probability 1/2. All
  randomness comes from ``rng``; the train step should pass ``fold_in(rng, step)``.

  Args:
    rng: a PRNG key.
    images: ``uint8 [N, H, W, C]``; not mutated.
    mean, std: per-channel statistics in 0–1 units.
    crop_padding: padding for the random crop; 0 disables cropping.
    flip: random horizontal flips.
    out_size: resize (bilinear) to this size (int or ``(h, w)``) after cropping.
    dtype: output dtype.

  Returns:
    ``dtype [N, out_h, out_w, C]``.
  """
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  x = jnp.asarray(images)
  if crop_padding > 0:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * p + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    x = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
    x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
  x = _resize(x.astype(jnp.float32), out_size)
  return normalize(x, mean, std, dtype)


def preprocess_eval(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                    out_size: int | Sequence[int] | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """Evaluation preprocessing: optional bilinear resize to ``out_size`` then :func:`normalize`.

  Args:
    images: ``uint8 [N, H, W, C]``; not mutated.
    mean, std: per-channel statistics in 0–1 units.
    out_size: int or ``(h, w)``; ``None`` keeps the size.
    dtype: output dtype.

  Returns:
    ``dtype [N, out_h, out_w, C]``.
  """
  return normalize(_resize(jnp.asarray(images).astype(jnp.float32), out_size), mean, std, dtype)


# --- mixup, cutmix, random erasing --------------------------------------------------------------------


def mix_targets(targets: Array, lam: Array) -> Array:
  """``lam · targets + (1 - lam) · targets[::-1]``: the targets of a batch mixed by :func:`mix_batch`.

  Each row stays a distribution (sums to 1) when the rows of ``targets`` do.

  Args:
    targets: ``[N, C]``; not mutated.
    lam: scalar weight of each example's own targets.
  """
  return lam * targets + (1.0 - lam) * targets[::-1]


def cutmix_box(rng: Array, height: int, width: int, alpha: float) -> tuple[Array, Array]:
  """Samples a cutmix box and returns ``(mask [H, W] bool, lam)``.

  ``lam0 ~ Beta(alpha, alpha)``; the box has sides ``⌊H·√(1-lam0)⌋ × ⌊W·√(1-lam0)⌋`` around a uniform
  random centre and is clipped at the image border, so ``lam`` is recomputed as ``1 - box area / (H·W)``
  — exactly the share of pixels an example keeps from itself.
  """
  k_lam, k_y, k_x = jax.random.split(rng, 3)
  lam0 = jax.random.beta(k_lam, alpha, alpha)
  ratio = jnp.sqrt(1.0 - lam0)
  ch = jnp.floor(height * ratio).astype(jnp.int32)
  cw = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch - ch // 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw - cw // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  return mask, lam


def mix_batch(rng: Array, images: Array, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              prob: float = 1.0, switch_prob: float = 0.5) -> tuple[Array, Array]:
  """mixup or cutmix of a batch with its reverse, one ``lam`` for the whole batch (as timm's default).

  With probability ``prob`` the batch is mixed; if both alphas are positive, cutmix is chosen with
  probability ``switch_prob``, else the enabled one. mixup: ``lam ~ Beta(α, α)`` and
  ``x = lam · x + (1 - lam) · x[::-1]``; cutmix: a box of ``x[::-1]`` is pasted (:func:`cutmix_box`).
  Mix the targets with the returned ``lam`` via :func:`mix_targets`.

  Args:
    rng: a PRNG key.
    images: ``[N, H, W, C]`` float; not mutated.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind.
    prob: probability of mixing this batch at all.
    switch_prob: probability of cutmix when both kinds are enabled.

  Returns:
    ``(mixed images, lam)``; ``lam == 1`` (and the images unchanged) when not mixed.
  """
  one = jnp.ones((), jnp.float32)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, one
  k_apply, k_switch, k_mix, k_cut = jax.random.split(rng, 4)
  rev = images[::-1]
  if mixup_alpha > 0:
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha).astype(jnp.float32)
    mixed_mix = (lam_mix * images + (1.0 - lam_mix) * rev).astype(images.dtype)
  if cutmix_alpha > 0:
    mask, lam_cut = cutmix_box(k_cut, images.shape[1], images.shape[2], cutmix_alpha)
    mixed_cut = jnp.where(mask[None, :, :, None], rev, images)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cut = jax.random.bernoulli(k_switch, switch_prob)
    mixed = jnp.where(use_cut, mixed_cut, mixed_mix)
    lam = jnp.where(use_cut, lam_cut, lam_mix)
  elif cutmix_alpha > 0:
    mixed, lam = mixed_cut, lam_cut
  else:
    mixed, lam = mixed_mix, lam_mix
  apply = jax.random.bernoulli(k_apply, prob)
  return jnp.where(apply, mixed, images), jnp.where(apply, lam, one)


def random_erasing(rng: Array, images: Array, prob: float, *, area: tuple[float, float] = (0.02, 1 / 3),
                   aspect: tuple[float, float] = (0.3, 3.3), value: float = 0.0) -> Array:
  """Random erasing (Zhong et al. 2017): per example, with probability ``prob``, fill a random box.

  The box covers a uniform share in ``area`` of the image with a log-uniform aspect ratio in ``aspect``
  (clipped to the image) and is filled with ``value`` — 0 on normalised images is the dataset mean.

  Args:
    rng: a PRNG key.
    images: ``[N, H, W, C]`` (normalised); not mutated.
    prob: per-example probability; 0 returns ``images`` unchanged.

  Returns:
    The images with the boxes filled.
  """
  if prob <= 0:
    return images
  n, h, w, _ = images.shape
  k_on, k_area, k_ar, k_y, k_x = jax.random.split(rng, 5)
  on = jax.random.bernoulli(k_on, prob, (n,))
  s = jax.random.uniform(k_area, (n,), minval=area[0], maxval=area[1]) * (h * w)
  r = jnp.exp(jax.random.uniform(k_ar, (n,), minval=math.log(aspect[0]), maxval=math.log(aspect[1])))
  eh = jnp.clip(jnp.round(jnp.sqrt(s * r)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(s / r)), 1, w).astype(jnp.int32)
  y0 = jnp.floor(jax.random.uniform(k_y, (n,)) * (h - eh + 1)).astype(jnp.int32)
  x0 = jnp.floor(jax.random.uniform(k_x, (n,)) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  box = ((rows >= y0[:, None, None]) & (rows < (y0 + eh)[:, None, None]) &
         (cols >= x0[:, None, None]) & (cols < (x0 + ew)[:, None, None]) & on[:, None, None])
  return jnp.where(box[..., None], jnp.asarray(value, images.dtype), images)
