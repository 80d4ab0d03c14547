"""Specs of the torchvision ResNet family and the CIFAR ResNets of He et al. (2016)."""

from __future__ import annotations

from jaxft.models.spec import BlockSpec, HeadSpec, ModelSpec, StageSpec, StemSpec


def resnet_spec(depths: tuple[int, ...], block: str, num_classes: int = 1000, *, groups: int = 1,
                width_per_group: int = 64, act: str = "relu") -> ModelSpec:
  """A torchvision ResNet (v1.5: the stride sits on the 3×3 conv of a bottleneck).

  Args:
    depths: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    block: ``basic`` or ``bottleneck``.
    num_classes: classes of the head.
    groups: groups of the 3×3 conv (ResNeXt).
    width_per_group: 64 for ResNet, 128 for Wide ResNet-50-2, 4 for ResNeXt-50 32×4d.
    act: activation of every block.

  Returns:
    A new :class:`ModelSpec`.
  """
  expansion = 4 if block == "bottleneck" else 1
  stages = []
  for i, n in enumerate(depths):
    planes = 64 * 2**i
    width = int(planes * (width_per_group / 64.0)) * groups
    blocks = tuple(
        BlockSpec(name=f"block{j}", kind=block, width=width if block == "bottleneck" else planes,
                  out=planes * expansion, stride=2 if (j == 0 and i > 0) else 1, groups=groups,
                  act=act)
        for j in range(n))
    stages.append(StageSpec(name=f"layer{i + 1}", blocks=blocks))
  return ModelSpec(family="resnet", stem=StemSpec(width=64, kernel=7, stride=2, pool=True, act=act),
                   stages=tuple(stages), heads=(HeadSpec("head", num_classes),), shortcut="conv")


def cifar_resnet_spec(depth: int, num_classes: int = 10, act: str = "relu") -> ModelSpec:
  """He et al. (2016) CIFAR ResNet-``depth`` (6n+2 layers; widths 16/32/64; option-A shortcuts)."""
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
  n = (depth - 2) // 6
  stages = tuple(
      StageSpec(name=f"layer{i + 1}", blocks=tuple(
          BlockSpec(name=f"block{j}", kind="basic", width=w, out=w,
                    stride=2 if (j == 0 and i > 0) else 1, act=act) for j in range(n)))
      for i, w in enumerate((16, 32, 64)))
  return ModelSpec(family="cifar_resnet",
                   stem=StemSpec(width=16, kernel=3, stride=1, pool=False, act=act),
                   stages=stages, heads=(HeadSpec("head", num_classes),), shortcut="option_a")
