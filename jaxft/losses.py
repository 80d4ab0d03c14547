"""Loss terms for fine-tuning: pure, jit-compatible functions of arrays.

The train loop (``jaxft.train``) builds its loss as a weighted sum of named terms, each one of the
functions here:

* :func:`soft_cross_entropy` on :func:`one_hot_targets` (label smoothing) — the main head and every
  multi-task head;
* :func:`distillation_kl` — Hinton et al.'s KL between temperature-softened teacher and student
  distributions, scaled by ``T²`` so that its gradients keep their size as ``T`` changes;
* :func:`feature_mse` / :func:`similarity_loss` — feature distillation on pooled features, directly when
  the widths agree (or through a :func:`fixed_projection` of the teacher's features), or
  width-free by comparing the two batch similarity matrices (Tung & Mori 2019);
* :func:`delta_feature_loss` — DELTA (Li et al. 2019): stage feature maps kept close to the pretrained
  model's, each channel weighted by its attention (computed once by ``jaxft.train.delta``);
* :func:`batch_spectral_shrinkage` — BSS (Chen et al. 2019): the k smallest squared singular values of
  the batch's pooled feature matrix. Regularization is described in ``docs/regularization.md``.

Image transforms (mixup, cutmix, random erasing) live in ``jaxft.data.transforms``, weight averaging
in ``jaxft.ema``.

All randomness comes from the ``rng`` argument; nothing here mutates its inputs.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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
# Regularizers toward the pretrained model's features (docs/regularization.md).
# ---------------------------------------------------------------------------------------------------


def delta_feature_loss(student: dict[str, Array], reference: dict[str, Array],
                       attention: dict[str, Array]) -> Array:
  """DELTA's attentive feature distance (Li et al. 2019), summed over stages.

  ``Σ_stage Σ_c attention[stage][c] · mean_{n,h,w} (student[stage] - reference[stage])²[n,h,w,c]``: each
  channel's squared distance is averaged over batch and positions (so the value does not grow with the
  resolution) and weighted by its attention (a softmax over the stage's channels, summing to 1). Neither
  the reference features nor the attention get a gradient.

  Args:
    student, reference: ``{stage: [N, H, W, C]}`` feature maps, reference from the pretrained model;
      every stage of ``attention`` must be in both. Not mutated.
    attention: ``{stage: [C]}`` channel weights.

  Returns:
    A float32 scalar, 0 when the feature maps agree.
  """
  total = jnp.float32(0.0)
  for name, a in attention.items():
    t = jax.lax.stop_gradient(reference[name]).astype(jnp.float32)
    per_channel = jnp.mean(jnp.square(student[name].astype(jnp.float32) - t), axis=(0, 1, 2))
    total = total + jnp.sum(jax.lax.stop_gradient(a).astype(jnp.float32) * per_channel)
  return total


def batch_spectral_shrinkage(features: Array, k: int = 1) -> Array:
  """BSS (Chen et al. 2019): ``Σ_{i=1..k} σ_{-i}²``, the ``k`` smallest squared singular values of the
  ``[N, D]`` pooled feature matrix of the batch.

  Shrinking the small singular values suppresses the feature directions that transfer poorly (the
  paper's negative transfer); the gradient of ``σ_i`` is ``u_i v_iᵀ`` (``jnp.linalg.svd``'s VJP).

  Args:
    features: ``[N, D]``; not mutated.
    k: how many of the smallest singular values, ``1 <= k <= min(N, D)``.

  Returns:
    A float32 scalar.
  """
  sigma = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # descending
  return jnp.sum(jnp.square(sigma[-k:]))


__all__ = [
    "batch_spectral_shrinkage", "delta_feature_loss", "distillation_kl", "feature_mse",
    "fixed_projection", "one_hot_targets", "similarity_loss", "soft_cross_entropy",
]
