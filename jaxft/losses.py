"""Loss terms for fine-tuning: pure, jit-compatible functions of arrays.

The train loop (``jaxft.train``) builds its loss as a weighted sum of named terms, each one of the
functions here:

* :func:`soft_cross_entropy` on :func:`one_hot_targets` (label smoothing) — the main head and every
  multi-task head;
* :func:`distillation_kl` — Hinton et al.'s KL between temperature-softened teacher and student
  distributions, scaled by ``T²`` so that its gradients keep their size as ``T`` changes;
* :func:`feature_mse` / :func:`similarity_loss` — feature distillation on pooled features, directly when
  the widths agree (or through a :func:`fixed_projection` of the teacher's features), or
  width-free by comparing the two batch similarity matrices (Tung & Mori 2019).

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


__all__ = [
    "distillation_kl", "feature_mse", "fixed_projection", "one_hot_targets", "similarity_loss",
    "soft_cross_entropy",
]
