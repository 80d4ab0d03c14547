"""The training objective: a weighted sum of named loss terms, and the frozen teacher they may use.

To add a loss term: give it a weight in :class:`Objective` (and a ``config.loss`` field read in
``jaxft.train.setup.build_objective``), compute it in :func:`loss_terms` from the network's outputs
(``logits``, ``heads``, ``features``, ``stages``), the mixed targets and the teacher's (or the DELTA
reference's) outputs, and it is summed into
the loss with its weight and logged as ``loss_<name>`` by the train step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxft import losses
from jaxft.train.tasks import Task

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss: a weighted sum of named terms (see :mod:`jaxft.losses`).

  Terms: ``ce`` (main head cross-entropy on smoothed, mixed targets; weight ``ce``), ``task_<name>``
  (each task head's cross-entropy; its ``Task.weight``), ``kd`` (``T²·KL`` to the teacher's softened
  logits; weight ``kd``) and ``feature`` (pooled-feature distillation, ``feature_mode`` one of ``mse``,
  ``project``, ``similarity``; weight ``feature``), ``delta`` (DELTA's attentive distance of stage
  feature maps to the pretrained model's; weight ``delta``) and ``bss`` (batch spectral shrinkage of
  the pooled features, the ``bss_k`` smallest singular values; weight ``bss``). A term whose weight is 0
  is not computed, except ``ce``, which is always logged.
  """

  ce: float = 1.0
  kd: float = 0.0
  feature: float = 0.0
  temperature: float = 1.0
  feature_mode: str = "mse"
  tasks: tuple[Task, ...] = ()
  delta: float = 0.0
  bss: float = 0.0
  bss_k: int = 1


@dataclasses.dataclass(frozen=True)
class TeacherNet:
  """The frozen teacher as the train step sees it; its variables are an argument of the step.

  Attributes:
    net: its flax module (run in eval mode: running BN statistics, no dropout).
    mean, std: its input normalisation (the student's batch is re-normalised when they differ).
    out_size: its input size, or None to feed the student's size.
    projection: ``[teacher width, student width]`` fixed matrix for ``feature_mode='project'``.
  """

  net: Any
  mean: tuple[float, ...]
  std: tuple[float, ...]
  out_size: int | None = None
  projection: Any = None

  def outputs(self, variables: Any, x: Array, mean: tuple[float, ...],
              std: tuple[float, ...]) -> dict[str, Any]:
    """The teacher's eval-mode outputs (no gradient) on the student's batch ``x``, normalised with
    ``mean``/``std``: re-normalised and resized first when the teacher expects otherwise."""
    if tuple(self.mean) != tuple(mean) or tuple(self.std) != tuple(std):
      m_s, s_s = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
      m_t, s_t = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
      x = ((x.astype(jnp.float32) * s_s + m_s) - m_t) / s_t
    if self.out_size and x.shape[1:3] != (self.out_size, self.out_size):
      x = jax.image.resize(x, (x.shape[0], self.out_size, self.out_size, x.shape[3]), method="bilinear")
    return jax.lax.stop_gradient(self.net.apply(variables, x, train=False, return_all=True))


def loss_terms(obj: Objective, out: dict[str, Any], targets: dict[str, Array],
               teacher: TeacherNet | None, t_out: dict[str, Any] | None,
               reference: dict[str, Any] | None = None) -> dict[str, tuple[float, Array]]:
  """Returns ``{term name: (weight, unweighted value)}``.

  Args:
    obj: the weights and settings.
    out: the student's ``return_all`` outputs (``logits``, ``heads``, ``features``).
    targets: the mixed target distributions: ``ce`` for the main head, each task's name for its head.
    teacher, t_out: the teacher and its outputs on the same batch (None without distillation).
    reference: for ``delta``, ``{'stages': the pretrained model's stage outputs on the same batch,
      'attention': {stage: [C] channel weights}}`` (None without it).
  """
  terms = {"ce": (obj.ce, losses.soft_cross_entropy(out["logits"], targets["ce"]))}
  for t in obj.tasks:
    terms[f"task_{t.name}"] = (t.weight, losses.soft_cross_entropy(out["heads"][t.name], targets[t.name]))
  if obj.kd:
    terms["kd"] = (obj.kd, losses.distillation_kl(out["logits"], t_out["logits"], obj.temperature))
  if obj.feature:
    fs, ft = out["features"], t_out["features"]
    if obj.feature_mode == "similarity":
      value = losses.similarity_loss(fs, ft)
    else:
      if obj.feature_mode == "project":
        ft = ft @ jnp.asarray(teacher.projection)
      value = losses.feature_mse(fs, ft)
    terms["feature"] = (obj.feature, value)
  if obj.delta:
    terms["delta"] = (obj.delta, losses.delta_feature_loss(out["stages"], reference["stages"],
                                                           reference["attention"]))
  if obj.bss:
    terms["bss"] = (obj.bss, losses.batch_spectral_shrinkage(out["features"], obj.bss_k))
  return terms
