"""Loss terms and batch mixing for fine-tuning: pure, jit-compatible functions of arrays.

The train loop (``jaxft.train``) builds its loss as a weighted sum of named terms, each one of the
functions here:

* :func:`soft_cross_entropy` on :func:`one_hot_targets` (label smoothing) — the main head and every
  multi-task head;
* :func:`distillation_kl` — Hinton et al.'s KL between temperature-softened teacher and student
  distributions, scaled by ``T²`` so that its gradients keep their size as ``T`` changes;
* :func:`feature_mse` / :func:`similarity_loss` — feature distillation on pooled features, directly when
  the widths agree (or through a :func:`fixed_projection` of the teacher's features), or
  width-free by comparing the two batch similarity matrices (Tung & Mori 2019).

Batch regularisers that act on images (and their targets) on device: :func:`mix_batch` (mixup or
cutmix with a batch-wide ``lam``, partner = the batch reversed) with :func:`mix_targets`, and
:func:`random_erasing`. Weight averaging: :func:`ema_decay` and :func:`ema_update`.

All randomness comes from the ``rng`` argument; nothing here mutates its inputs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Tree = Any


# ---------------------------------------------------------------------------------------------------
# Classification and distillation terms.
# ---------------------------------------------------------------------------------------------------


def one_hot_targets(labels: Array, num_classes: int, smoothing: float = 0.0) -> Array:
  """Returns ``[N, C]`` float32 targets: one-hot, label-smoothed as ``(1 - s) · onehot + s / C``.

  Args:
    labels: int ``[N]`` class indices; not mutated.
    num_classes: ``C``.
    smoothing: ``s`` in ``[0, 1)``; 0 gives plain one-hot targets.
  """
  t = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if smoothing:
    t = t * (1.0 - smoothing) + smoothing / num_classes
  return t


def soft_cross_entropy(logits: Array, targets: Array) -> Array:
  """Mean over the batch of ``-Σ_c targets[c] · log_softmax(logits)[c]``.

  Args:
    logits: ``[N, C]``; not mutated.
    targets: ``[N, C]`` distributions (one-hot, smoothed, or mixed by :func:`mix_targets`).

  Returns:
    A float32 scalar.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def distillation_kl(student_logits: Array, teacher_logits: Array, temperature: float = 1.0) -> Array:
  """``T² · mean_n KL(softmax(teacher / T) ‖ softmax(student / T))`` (Hinton et al. 2015).

  The ``T²`` factor keeps the gradient scale of this term independent of ``T``, so its weight can be
  chosen once. No gradient flows into ``teacher_logits``.

  Args:
    student_logits: ``[N, C]``; not mutated.
    teacher_logits: ``[N, C]``; not mutated.
    temperature: ``T > 0``.

  Returns:
    A float32 scalar, 0 when the two agree.
  """
  t = float(temperature)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return (t * t) * jnp.mean(kl)


def feature_mse(student_features: Array, teacher_features: Array) -> Array:
  """Mean squared difference of ``[N, D]`` pooled features (the teacher's get no gradient).

  Args:
    student_features, teacher_features: ``[N, D]`` of the same width; not mutated.

  Returns:
    ``mean((student - teacher)²)`` over batch and features, a float32 scalar.
  """
  t = jax.lax.stop_gradient(teacher_features).astype(jnp.float32)
  return jnp.mean(jnp.square(student_features.astype(jnp.float32) - t))


def _row_normalised_gram(f: Array) -> Array:
  g = f @ f.T
  return g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def similarity_loss(student_features: Array, teacher_features: Array) -> Array:
  """Similarity-preserving distillation (Tung & Mori 2019): works for any two feature widths.

  Each side's ``[N, N]`` batch Gram matrix ``F Fᵀ`` is L2-normalised row by row; the loss is
  ``‖G_student - G_teacher‖²_F / N²``. The teacher's side gets no gradient.

  Args:
    student_features: ``[N, Ds]``; not mutated.
    teacher_features: ``[N, Dt]``; not mutated.

  Returns:
    A float32 scalar.
  """
  n = student_features.shape[0]
  gs = _row_normalised_gram(student_features.astype(jnp.float32))
  gt = _row_normalised_gram(jax.lax.stop_gradient(teacher_features).astype(jnp.float32))
  return jnp.sum(jnp.square(gs - gt)) / (n * n)


def fixed_projection(in_width: int, out_width: int, seed: int = 0) -> np.ndarray:
  """A fixed ``[in_width, out_width]`` random matrix with orthonormal columns (or rows, if wider).

  Used to map teacher features to the student's width for :func:`feature_mse` when they differ:
  orthonormal columns preserve the geometry of the projected subspace, and because the matrix is a
  function of ``(in_width, out_width, seed)`` only, it needs no training and no checkpointing.

  Returns:
    A new float32 numpy array.
  """
  a = np.random.default_rng(seed).standard_normal((max(in_width, out_width), min(in_width, out_width)))
  q, _ = np.linalg.qr(a)
  q = q.astype(np.float32)
  return q if in_width >= out_width else q.T


# ---------------------------------------------------------------------------------------------------
# mixup / cutmix / random erasing.
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Exponential moving average of weights.
# ---------------------------------------------------------------------------------------------------


def ema_decay(step: Array | int, decay: float, warmup: bool = True) -> Array:
  """The decay used at optimizer step ``step`` (0-based).

  With ``warmup``, ``min(decay, (1 + step) / (10 + step))`` (as TensorFlow's ExponentialMovingAverage
  with ``num_updates``), so that an average started at fine-tuning time is not dominated by the
  pretrained weights for the first ``~1 / (1 - decay)`` steps; else ``decay``.
  """
  d = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return d
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum(d, (1.0 + s) / (10.0 + s))


def ema_update(ema: Tree, new: Tree, decay: Array | float) -> Tree:
  """Returns ``decay · ema + (1 - decay) · new`` leaf by leaf (a new tree; neither input is mutated)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, new)


__all__ = [
    "cutmix_box", "distillation_kl", "ema_decay", "ema_update", "feature_mse", "fixed_projection",
    "mix_batch", "mix_targets", "one_hot_targets", "random_erasing", "similarity_loss",
    "soft_cross_entropy",
]
