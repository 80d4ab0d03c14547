"""Plain structural data that fully describes a network.

Every model in jaxft is built from a :class:`ModelSpec`: a frozen, hashable tree of dataclasses that
holds only numbers and strings (depths, widths, strides, block kinds, activations, head sizes). Surgery
(``jaxft.surgery``) edits a spec with ``dataclasses.replace`` and never needs new model code; checkpoints
store ``spec.to_dict()`` so that a model can be rebuilt without the config that made it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One residual block.

  Attributes:
    name: module name inside its stage (``block0`` …). Names stay stable under surgery, so removing a block
      leaves the paths of the others unchanged.
    kind: ``basic`` (two 3×3 convs), ``bottleneck`` (1×1, k×k, 1×1) or ``mbconv`` (inverted residual).
    width: inner width (``basic``: conv1 output; ``bottleneck``: conv1/conv2 width; ``mbconv``: expanded
      width; equal to the input width means no expansion conv).
    out: output channels.
    stride: spatial stride (on the k×k conv, torchvision v1.5 style).
    kernel: size of the spatial conv.
    groups: groups of the spatial conv (``bottleneck`` ResNeXt) — ``mbconv`` is always depthwise.
    act: activation name (see ``jaxft.models.layers.ACTIVATIONS``).
    adapter: width of a residual 1×1 bottleneck adapter applied after the block; 0 means none.
  """

  name: str
  kind: str
  width: int
  out: int
  stride: int = 1
  kernel: int = 3
  groups: int = 1
  act: str = "relu"
  adapter: int = 0


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A named sequence of blocks (``layer1`` … in torchvision ResNets)."""

  name: str
  blocks: tuple[BlockSpec, ...]


@dataclasses.dataclass(frozen=True)
class StemSpec:
  """The input stem: one k×k conv + BN + activation, optionally a 3×3/2 max-pool."""

  width: int
  kernel: int = 7
  stride: int = 2
  pool: bool = True
  act: str = "relu"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """A classifier on pooled features: optional dropout, then a dense layer."""

  name: str
  num_classes: int
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """A low-rank update of one conv's kernel (LoRA), grafted by ``jaxft.surgery.add_lora``.

  The conv computes ``conv(x, W + (alpha / rank) * reshape(A @ B))`` where ``A`` is
  ``(kh·kw·cin) × rank`` and ``B`` is ``rank × cout``: the network runs it as two sibling convs at
  ``<module>_lora/down`` (kh×kw, cin→rank, the conv's stride and padding) and ``<module>_lora/up``
  (1×1, rank→cout), added to the conv's output (see ``jaxft.models.network``).

  Attributes:
    module: the conv's module path (``layer1/block0/conv1``, ``stem/conv``, ``neck_conv``,
      ``layer2/block0/downsample_conv``).
    rank: the rank ``r`` (>= 1).
    alpha: the update is scaled by ``alpha / rank``.
  """

  module: str
  rank: int
  alpha: float

  @property
  def scale(self) -> float:
    """``alpha / rank``, the factor of the low-rank update."""
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A whole network: stem → stages → optional 1×1 ``neck`` conv → global average pool → heads.

  Attributes:
    family: ``resnet``, ``cifar_resnet`` or ``efficientnet_lite`` — used only by weight conversion.
    stem: the stem.
    stages: the stages, in order.
    heads: the classifier heads. The first is the main head and is always named ``head``; extra heads
      (multi-task) are named by surgery and live at ``head_<name>``.
    neck_width: output width of a 1×1 conv + BN + act before pooling (EfficientNet's ``conv_head``);
      0 means none.
    neck_act: activation of the neck.
    shortcut: how a block whose shape changes maps its input: ``conv`` (1×1 strided conv + BN,
      torchvision) or ``option_a`` (parameter-free: subsample + zero-pad channels, He et al. 2016 CIFAR).
    bn_eps: BatchNorm epsilon.
    bn_momentum: BatchNorm momentum in the flax convention (torch's 0.1 is flax's 0.9).
    padding: how strided k×k convs pad: ``torch`` (``k // 2`` on each side) or ``same`` (TensorFlow's
      ``SAME``: the extra pixel goes to the bottom/right), which weights trained in TensorFlow (e.g.
      EfficientNet-Lite) expect. Stride-1 convs pad the same either way.
    lora: the convs that carry a LoRA update (:class:`LoraSpec`), in network order.
    folded_bn: every BatchNorm is folded into the conv before it (``jaxft.surgery.fold_batchnorm``):
      those convs have a ``bias`` and the BN modules (and their ``batch_stats``) do not exist.
  """

  family: str
  stem: StemSpec
  stages: tuple[StageSpec, ...]
  heads: tuple[HeadSpec, ...]
  neck_width: int = 0
  neck_act: str = "relu"
  shortcut: str = "conv"
  bn_eps: float = 1e-5
  bn_momentum: float = 0.9
  padding: str = "torch"
  lora: tuple[LoraSpec, ...] = ()
  folded_bn: bool = False

  @property
  def num_classes(self) -> int:
    """Number of classes of the main head."""
    return self.heads[0].num_classes

  @property
  def feature_width(self) -> int:
    """Width of the pooled features that the heads read."""
    if self.neck_width:
      return self.neck_width
    for stage in reversed(self.stages):
      if stage.blocks:
        return stage.blocks[-1].out
    return self.stem.width

  def stage(self, name: str) -> StageSpec:
    """Returns the stage called ``name``; raises ``KeyError`` naming the valid stages."""
    for st in self.stages:
      if st.name == name:
        return st
    raise KeyError(f"no stage {name!r}; stages are {[s.name for s in self.stages]}")

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable nested dict; ``ModelSpec.from_dict`` inverts it exactly."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
    """Builds a spec from ``to_dict`` output (lists or tuples); the input is never mutated."""
    d = dict(d)
    stem = StemSpec(**d.pop("stem"))
    stages = tuple(
        StageSpec(name=s["name"], blocks=tuple(BlockSpec(**b) for b in s["blocks"]))
        for s in d.pop("stages"))
    heads = tuple(HeadSpec(**h) for h in d.pop("heads"))
    lora = tuple(LoraSpec(**x) for x in d.pop("lora", ()))  # absent in specs saved before LoRA
    return cls(stem=stem, stages=stages, heads=heads, lora=lora, **d)
