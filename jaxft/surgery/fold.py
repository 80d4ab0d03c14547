"""Folding BatchNorm into the conv before it, for deployment: :func:`fold_batchnorm`.

In eval mode a BN is the per-channel affine map ``y = x · m + (β - μ · m)`` with
``m = γ / sqrt(σ² + ε)`` (exactly how ``jaxft.models.layers.BatchNorm`` computes it), and the conv before
it is linear in its output channels, so ``BN(conv(x, W)) = conv(x, W · m) + (β - μ · m)``. The folded
model (``ModelSpec.folded_bn``) has a ``bias`` on every such conv and no BN modules (so no
``batch_stats``); a conv's LoRA update (``<conv>_lora``) is linear in the output channels too, so its
``up`` factor is scaled by ``m`` and it stays trainable. Folding changes training-mode behaviour on
purpose (no batch statistics any more); eval-mode logits are unchanged up to float rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models.model import Model
from jaxft.surgery.lora import lora_module
from jaxft.surgery.rebuild import op_record, rebuild
from jaxft.surgery.select import conv_sites

__all__ = ["fold_batchnorm"]


def require_bn(model: Model, op: str) -> None:
  """Raises ``ValueError`` naming ``op`` when ``model``'s BatchNorms are folded (the op needs them)."""
  if model.spec.folded_bn:
    raise ValueError(f"{op} needs BatchNorm layers, but this model's BNs are folded into its convs "
                     f"(fold_batchnorm); apply {op} before folding")


def bn_multiplier(scale: jax.Array, var: jax.Array, eps: float) -> np.ndarray:
  """``scale / sqrt(var + eps)`` as a new float32 numpy array (the eval-mode BatchNorm's multiplier)."""
  return np.asarray(scale, np.float32) / np.sqrt(np.asarray(var, np.float32) + np.float32(eps))


def fold_batchnorm(model: Model) -> Model:
  """Returns ``model`` with every BatchNorm folded into the conv before it (eval-mode function kept).

  Each conv ``W`` followed by a BN ``(γ, β, μ, σ²)`` becomes ``W · m`` with bias ``β - μ · m``,
  ``m = γ / sqrt(σ² + ε)`` per output channel; a LoRA ``up`` factor on that conv is scaled by ``m``.
  Each BN's ``scale`` and ``bias`` become the conv's one ``bias`` (one parameter fewer per channel);
  the ``batch_stats`` collection is empty.

  Args:
    model: never mutated.

  Raises:
    ValueError: the model is already folded, or has a BN that follows no conv surgery knows.
  """
  require_bn(model, "fold_batchnorm")
  spec = model.spec
  sites = conv_sites(spec, model.params)
  bns = {p.rsplit("/", 1)[0] for p in paths.flatten(model.batch_stats)}
  unknown = sorted(bns - {s.bn for s in sites})
  if unknown:
    raise ValueError(f"fold_batchnorm: no conv precedes the BatchNorms {unknown}")
  lora = {x.module for x in spec.lora}
  host = lambda a: np.asarray(a, np.float32)
  # numpy on the host: a one-off per conv, where eager jax would compile a kernel for every shape.
  values = {}
  for s in sites:
    bn, stats = paths.get(model.params, s.bn), paths.get(model.batch_stats, s.bn)
    m = bn_multiplier(bn["scale"], stats["var"], spec.bn_eps)
    values[f"params/{s.conv}/kernel"] = host(paths.get(model.params, f"{s.conv}/kernel")) * m
    values[f"params/{s.conv}/bias"] = host(bn["bias"]) - host(stats["mean"]) * m
    if s.conv in lora:
      up = f"{lora_module(s.conv)}/up/kernel"
      values[f"params/{up}"] = host(paths.get(model.params, up)) * m
  values = {p: jnp.asarray(v) for p, v in values.items()}
  new = dataclasses.replace(spec, folded_bn=True)
  return rebuild(model, new, op_record("fold_batchnorm"), values=values)
