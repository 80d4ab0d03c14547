"""LoRA as surgery: :func:`add_lora` grafts low-rank updates onto conv kernels, :func:`merge_lora` folds
them back in.

A LoRA update of a conv with kernel ``W`` (kh×kw×cin×cout) is ``(alpha / r) · reshape(A @ B)`` where
``A`` is ``(kh·kw·cin) × r`` and ``B`` is ``r × cout``. It is structure, so it lives in the spec
(``ModelSpec.lora``, one :class:`~jaxft.models.spec.LoraSpec` per conv) and the network builds it as two
sibling convs at ``<conv>_lora/{down,up}`` (``jaxft.models.network``): ``down`` is ``A`` as a kh×kw
conv with the conv's stride and padding, ``up`` is ``B`` as a 1×1 conv. ``up`` starts at zero, so a model
computes the same function right after :func:`add_lora`. Both are ordinary ``Layers.conv`` modules: the
CPU backend, checkpoints, the evolution log and every other op see plain parameters.

Why not qwix's ``LoraProvider`` (which has the same factorisation): it adds the update by intercepting
``jax.lax.conv_general_dilated`` calls while a wrapped module runs, so (1) the update is not in the
``ModelSpec`` — ``abstract_variables``, :func:`~jaxft.surgery.rebuild.rebuild`, checkpoints and
:func:`~jaxft.surgery.replay` could not see it without the interception rules travelling beside the spec;
(2) the CPU backend's convs (GEMM, Winograd, oneDNN custom calls) never call that primitive, so the
update would silently vanish there; (3) it has no merge. Its rule is a few lines here instead.

The default optimizer rules of a model with LoRA train only the factors and the heads
(``jaxft.optim.LORA_RULES``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models.model import Model
from jaxft.models.spec import LoraSpec
from jaxft.surgery.rebuild import op_record, rebuild
from jaxft.surgery.select import check_expect, conv_sites

__all__ = ["add_lora", "merge_lora"]


def lora_module(conv: str) -> str:
  """The module holding the LoRA factors of conv ``conv``: ``layer1/block0/conv1_lora``."""
  return f"{conv}_lora"


def add_lora(model: Model, modules: str = ".*", rank: int = 4, alpha: float | None = None, *,
             expect: int | None = None, seed: int = 0) -> Model:
  """Returns ``model`` with a rank-``rank`` LoRA update on each selected conv, computing the same function.

  Args:
    model: never mutated.
    modules: regex over conv module paths (``stem/conv``, ``layer1/block0/conv1``,
      ``layer2/block0/downsample_conv``, ``neck_conv``), full-matched.
    rank: the rank ``r`` (>= 1, at most ``min(kh·kw·cin, cout)`` of each selected conv).
    alpha: the update is scaled by ``alpha / rank``; default ``rank`` (scale 1).
    expect: number of convs ``modules`` must match.
    seed: seeds the ``down`` factors (``up`` starts at zero).

  Returns:
    A new Model sharing every existing leaf; the factors are new leaves at ``<conv>_lora/{down,up}/kernel``.

  Raises:
    PathError: the selector matches no conv or not ``expect`` convs (naming the nearest).
    ValueError: bad rank or alpha, a grouped or depthwise conv, a conv that already has LoRA.
  """
  check_expect(expect)
  alpha = float(rank if alpha is None else alpha)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"LoRA alpha must be > 0 (the update is scaled by alpha / rank), got {alpha}")
  sites = {s.conv: s for s in conv_sites(model.spec, model.params)}
  chosen = paths.select(list(sites), modules, expect)
  grouped = [c for c in chosen if sites[c].grouped]
  if grouped:
    raise ValueError(f"LoRA on grouped/depthwise convs is not supported: {grouped}; select ungrouped "
                     "convs (e.g. exclude '.*depthwise_conv')")
  have = sorted(set(chosen) & {x.module for x in model.spec.lora})
  if have:
    raise ValueError(f"convs already have LoRA: {have} (merge_lora first to add a new one)")
  for c in chosen:
    kh, kw, cin, cout = paths.get(model.params, f"{c}/kernel").shape
    if rank > min(kh * kw * cin, cout):
      raise ValueError(f"LoRA rank {rank} exceeds the full rank {min(kh * kw * cin, cout)} of {c} "
                       f"(kernel {kh}×{kw}×{cin}×{cout}); choose rank <= {min(kh * kw * cin, cout)}")
  order = {c: i for i, c in enumerate(sites)}
  lora = sorted(model.spec.lora + tuple(LoraSpec(c, rank, alpha) for c in chosen),
                key=lambda x: order.get(x.module, len(order)))
  spec = dataclasses.replace(model.spec, lora=tuple(lora))
  return rebuild(model, spec, op_record("add_lora", modules=modules, rank=rank, alpha=alpha,
                                        expect=expect, seed=seed),
                 seed=seed, targets=[lora_module(c) for c in chosen])


def merged_kernel(kernel: jax.Array, down: jax.Array, up: jax.Array, scale: float) -> jax.Array:
  """Returns ``kernel + scale · reshape(A @ B)`` (``A``: ``down`` as ``(kh·kw·cin) × r``, ``B``: ``up`` as
  ``r × cout``) as a new float32 array; the inputs are never mutated.

  Computed on the host in numpy: a one-off per conv, where eager jax would compile a kernel for every
  shape, and the same bits on every backend (so a replayed merge equals the original).
  """
  r = down.shape[-1]
  a = np.asarray(down, np.float32).reshape(-1, r)
  b = np.asarray(up, np.float32).reshape(r, -1)
  delta = (a @ b) * np.float32(scale)
  return jnp.asarray(np.asarray(kernel, np.float32) + delta.reshape(kernel.shape))


def merge_lora(model: Model) -> Model:
  """Returns ``model`` with every LoRA update folded into its conv's kernel and the factors removed.

  The result has the structure (``spec.lora == ()``), parameter count and FLOPs of the model before
  :func:`add_lora`; its logits equal the unmerged ones up to float rounding.

  Args:
    model: never mutated.

  Raises:
    ValueError: the model has no LoRA update.
  """
  if not model.spec.lora:
    raise ValueError("merge_lora: the model has no LoRA update to merge (add_lora adds one)")
  values = {}
  for x in model.spec.lora:
    f = lora_module(x.module)
    values[f"params/{x.module}/kernel"] = merged_kernel(
        paths.get(model.params, f"{x.module}/kernel"), paths.get(model.params, f"{f}/down/kernel"),
        paths.get(model.params, f"{f}/up/kernel"), x.scale)
  spec = dataclasses.replace(model.spec, lora=())
  return rebuild(model, spec, op_record("merge_lora"), values=values)
