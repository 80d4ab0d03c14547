"""Batch image transforms that run on device inside the jitted train step: mixup, cutmix, random erasing."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array



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
