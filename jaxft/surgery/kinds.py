"""What surgery needs to know about each block kind (plain data; extend it for a new kind).

A new block kind works with the ops that only rebuild the spec as soon as ``Network`` can build it; the
ops that need to know which BN closes a residual branch (``append_blocks``), which channels are
"inner" (``prune_channels``, ``widen``) or which convs read and write the residual stream
(``widen_stage``),
which BN follows which conv (``fold_batchnorm``) or which conv is grouped (``add_lora``) read its
entry in :data:`BLOCK_KINDS`.
"""

from __future__ import annotations

import dataclasses

from jaxft.models.spec import BlockSpec


@dataclasses.dataclass(frozen=True)
class InnerGroup:
  """Channels inside a block that can be pruned together without changing the block's interface.

  Attributes:
    producer: conv module whose output channels (last kernel axis) are the group; ranks channels by
      L1 norm for ``criterion="l1"``.
    bn: BatchNorm that last normalises the group before it is consumed; ranks channels by ``|scale|``
      for ``criterion="bn_scale"`` (a channel whose scale and bias are 0 contributes nothing).
    slices: ``(module, axis)`` pairs; every leaf of ``module`` (params and batch_stats) is sliced along
      ``axis`` with the kept channel indices.
  """

  producer: str
  bn: str
  slices: tuple[tuple[str, int], ...]

  @property
  def consumer(self) -> str:
    """The conv that reads the group: the module sliced along its input axis (2)."""
    return next(module for module, axis in self.slices if axis == 2)

  @property
  def producers(self) -> tuple[str, ...]:
    """Every other module of the group (convs' output channels, BNs, the depthwise conv): the ones
    whose every leaf carries one entry per channel along its last axis."""
    return tuple(module for module, axis in self.slices if axis != 2)


@dataclasses.dataclass(frozen=True)
class BlockKind:
  """How surgery treats one block kind.

  Attributes:
    last_bn: the BN that closes the residual branch; zeroing its scale makes a new block the identity.
    inner: the prunable channel groups; all share ``BlockSpec.width``.
    needs_expansion: the inner width only exists when it differs from the input width (``mbconv``).
    input_conv: the conv that reads the block's input (when ``needs_expansion`` and there is no
      expansion conv, the inner group reads it instead).
    output_conv: the conv that writes the residual branch's output (normalised by ``last_bn``).
    conv_bn: ``(conv, bn)``: each conv of the block and the BN right after it (the projection shortcut,
      ``downsample_conv`` / ``downsample_bn``, is common to the kinds that have one and not listed).
    grouped: the conv that takes ``BlockSpec.groups`` (``""``: none, the kind ignores it);
      ``depthwise``: that conv is always depthwise.
  """

  last_bn: str
  inner: tuple[InnerGroup, ...]
  conv_bn: tuple[tuple[str, str], ...]
  grouped: str
  needs_expansion: bool = False
  input_conv: str = ""
  output_conv: str = ""
  depthwise: bool = False

  def grouped_convs(self, block: BlockSpec) -> tuple[str, ...]:
    """The convs of ``block`` (names inside it) that are grouped (``groups > 1`` or depthwise)."""
    return (self.grouped,) if self.grouped and (self.depthwise or block.groups > 1) else ()


BLOCK_KINDS: dict[str, BlockKind] = {
    "basic": BlockKind(
        last_bn="bn2",
        inner=(InnerGroup("conv1", "bn1", (("conv1", -1), ("bn1", 0), ("conv2", 2))),),
        conv_bn=(("conv1", "bn1"), ("conv2", "bn2")), grouped="",
        input_conv="conv1", output_conv="conv2"),
    "bottleneck": BlockKind(
        last_bn="bn3",
        inner=(InnerGroup("conv1", "bn1", (("conv1", -1), ("bn1", 0), ("conv2", 2))),
               InnerGroup("conv2", "bn2", (("conv2", -1), ("bn2", 0), ("conv3", 2)))),
        conv_bn=(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), grouped="conv2",
        input_conv="conv1", output_conv="conv3"),
    "mbconv": BlockKind(
        last_bn="bn2",
        inner=(InnerGroup("expand_conv", "bn1", (("expand_conv", -1), ("bn0", 0),
                                                 ("depthwise_conv", -1), ("bn1", 0),
                                                 ("project_conv", 2))),),
        conv_bn=(("expand_conv", "bn0"), ("depthwise_conv", "bn1"), ("project_conv", "bn2")),
        grouped="depthwise_conv", needs_expansion=True, depthwise=True, input_conv="expand_conv",
        output_conv="project_conv"),
}


def block_kind(kind: str) -> BlockKind:
  """Returns ``BLOCK_KINDS[kind]``; raises ``ValueError`` naming the known kinds."""
  try:
    return BLOCK_KINDS[kind]
  except KeyError:
    raise ValueError(f"surgery does not know block kind {kind!r}; describe it in "
                     f"jaxft.surgery.BLOCK_KINDS (known: {sorted(BLOCK_KINDS)})") from None
