"""Specs of the EfficientNet-Lite family (Tan & Le 2019, "Lite" variants for mobile/edge).

EfficientNet-Lite differs from EfficientNet-B* in ways that make it quantisation- and CPU-friendly: ReLU6
instead of swish, no squeeze-and-excitation, and a stem (32) and neck (1280) whose widths do not scale
with the width multiplier. Within the network, widths are scaled and rounded to multiples of 8 and the
number of blocks per stage is scaled up (rounded up), except in the first and the last stage, which keep
their single block. The weights come from TensorFlow, so strided convs pad as TF's ``SAME`` does.

Block ``j`` of the ``i``-th stage is named ``stage{i+1}/block{j}``; weight conversion numbers blocks
globally (``_blocks.0`` … ``_blocks.15`` for Lite0) in that order.
"""

from __future__ import annotations

import math

from jaxft.models.spec import BlockSpec, HeadSpec, ModelSpec, StageSpec, StemSpec

# The EfficientNet-B0 baseline: (repeats, kernel, stride of the first block, expansion ratio, out width).
BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_WIDTH = 32
NECK_WIDTH = 1280
# torch's BatchNorm momentum 0.01 (TF's 0.99) in the flax convention, and the TF epsilon.
BN_MOMENTUM = 0.99
BN_EPS = 1e-3

# name → (width multiplier, depth multiplier, input resolution, head dropout), as published.
LITE_VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def round_width(width: int, multiplier: float, divisor: int = 8) -> int:
  """Scales ``width`` and rounds to the nearest multiple of ``divisor``, never going below 90% of the
  scaled value (the rule of the reference implementation, so that checkpoints' shapes match)."""
  scaled = width * multiplier
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


def round_depth(repeats: int, multiplier: float) -> int:
  """Scales a number of blocks, rounding up."""
  return int(math.ceil(repeats * multiplier))


def efficientnet_lite_spec(width_mult: float = 1.0, depth_mult: float = 1.0, num_classes: int = 1000, *,
                           dropout: float = 0.2, act: str = "relu6") -> ModelSpec:
  """An EfficientNet-Lite network.

  Args:
    width_mult: multiplier of every block width (not of the stem or the neck).
    depth_mult: multiplier of the number of blocks of every stage but the first and the last.
    num_classes: classes of the head.
    dropout: dropout rate before the classifier (active in training only).
    act: activation everywhere (stem, blocks, neck).

  Returns:
    A new :class:`ModelSpec` of family ``efficientnet_lite``.
  """
  stages = []
  cin = STEM_WIDTH
  last = len(BASE_STAGES) - 1
  for i, (repeats, kernel, stride, expand, out) in enumerate(BASE_STAGES):
    n = repeats if i in (0, last) else round_depth(repeats, depth_mult)
    out = round_width(out, width_mult)
    blocks = []
    for j in range(n):
      # A block's inner width is its input width times the expansion ratio; ratio 1 (first stage) means
      # no expansion conv, which Network infers from width == input width.
      blocks.append(BlockSpec(name=f"block{j}", kind="mbconv", width=cin * expand, out=out,
                              stride=stride if j == 0 else 1, kernel=kernel, act=act))
      cin = out
    stages.append(StageSpec(name=f"stage{i + 1}", blocks=tuple(blocks)))
  return ModelSpec(family="efficientnet_lite",
                   stem=StemSpec(width=STEM_WIDTH, kernel=3, stride=2, pool=False, act=act),
                   stages=tuple(stages), heads=(HeadSpec("head", num_classes, dropout),),
                   neck_width=NECK_WIDTH, neck_act=act, bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM,
                   padding="same")


def lite_spec(name: str, num_classes: int = 1000) -> ModelSpec:
  """The spec of a published variant (``efficientnet_lite0`` … ``efficientnet_lite4``).

  Raises:
    KeyError: for an unknown variant, naming the valid ones.
  """
  try:
    w, d, _, drop = LITE_VARIANTS[name]
  except KeyError:
    raise KeyError(f"unknown EfficientNet-Lite variant {name!r}; valid: {sorted(LITE_VARIANTS)}") from None
  return efficientnet_lite_spec(w, d, num_classes, dropout=drop)
