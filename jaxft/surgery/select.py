"""Addressing stages, blocks and heads of a spec by name, and copies of a spec with some replaced.

Blocks are named ``"<stage>/<block>"`` (``layer2/block1``); a block selector is a regex matched against
whole block names (``jaxft.paths.select``). Unknown names raise :class:`~jaxft.paths.PathError` naming
the nearest valid ones. Nothing here mutates a spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from jaxft import paths
from jaxft.models.spec import BlockSpec, ModelSpec
from jaxft.paths import PathError
from jaxft.surgery.kinds import block_kind


def block_names(spec: ModelSpec) -> list[str]:
  """Returns every block as ``"<stage>/<block>"``, in network order."""
  return [f"{st.name}/{b.name}" for st in spec.stages for b in st.blocks]


def _index(names: Sequence[str], name: str, what: str) -> int:
  """Returns the position of ``name`` in ``names``; raises PathError naming the nearest valid ``what``s."""
  if name in names:
    return list(names).index(name)
  raise PathError(f"no {what} {name!r}; nearest valid {what}s: {paths.nearest(name, names)}")


def stage_index(spec: ModelSpec, stage: str) -> int:
  """Returns the position of stage ``stage``; raises PathError naming the nearest stages."""
  return _index([st.name for st in spec.stages], stage, "stage")


def block_index(spec: ModelSpec, block: str) -> tuple[int, int]:
  """Returns ``(stage index, block index)`` of ``"<stage>/<block>"``; raises PathError naming the nearest."""
  for i, st in enumerate(spec.stages):
    for j, b in enumerate(st.blocks):
      if f"{st.name}/{b.name}" == block:
        return i, j
  raise PathError(f"no block {block!r}; nearest valid blocks: "
                  f"{paths.nearest(block, block_names(spec))}")


def select_blocks(spec: ModelSpec, blocks: str, expect: int | None) -> list[tuple[int, int]]:
  """Returns ``(stage index, block index)`` of every block whose name matches the regex ``blocks``, in
  network order; raises PathError when it matches none, or not ``expect`` blocks."""
  hits = set(paths.select(block_names(spec), blocks, expect))
  return [(i, j) for i, st in enumerate(spec.stages) for j, b in enumerate(st.blocks)
          if f"{st.name}/{b.name}" in hits]


def head_index(spec: ModelSpec, head: str) -> int:
  """Returns the position of head ``head``; raises PathError naming the nearest heads."""
  return _index([h.name for h in spec.heads], head, "head")


def block_inputs(spec: ModelSpec) -> dict[str, int]:
  """Returns the input width of every block (``"<stage>/<block>"`` → channels)."""
  cin = spec.stem.width
  out = {}
  for st in spec.stages:
    for b in st.blocks:
      out[f"{st.name}/{b.name}"] = cin
      cin = b.out
  return out


@dataclasses.dataclass(frozen=True)
class ConvSite:
  """One conv of the network that a BatchNorm follows (or followed, before folding).

  Attributes:
    conv: module path (``stem/conv``, ``layer1/block0/conv1``, ``layer2/block0/downsample_conv``,
      ``neck_conv``).
    bn: the BN module path right after it (``stem/bn``, ``layer1/block0/bn1``, ``neck_bn`` …).
    grouped: the conv is grouped or depthwise.
  """

  conv: str
  bn: str
  grouped: bool = False


def conv_sites(spec: ModelSpec, params: Mapping[str, Any]) -> list[ConvSite]:
  """Returns every BN-followed conv of ``Network(spec)`` in network order (stem, blocks, neck).

  ``params`` (the model's, or abstract ones; never mutated) decides which optional convs exist (an
  ``mbconv`` without expansion has no ``expand_conv``, a same-shape block no ``downsample_conv``).

  Raises:
    ValueError: a block kind surgery does not know.
  """
  flat = paths.flatten(params)
  sites = [ConvSite("stem/conv", "stem/bn")]
  for st in spec.stages:
    for b in st.blocks:
      kind, pre = block_kind(b.kind), f"{st.name}/{b.name}"
      grouped = kind.grouped_convs(b)
      sites += [ConvSite(f"{pre}/{c}", f"{pre}/{n}", c in grouped) for c, n in kind.conv_bn]
      sites.append(ConvSite(f"{pre}/downsample_conv", f"{pre}/downsample_bn"))
  sites.append(ConvSite("neck_conv", "neck_bn"))
  return [s for s in sites if f"{s.conv}/kernel" in flat]


def with_blocks(spec: ModelSpec, new: Mapping[tuple[int, int], BlockSpec]) -> ModelSpec:
  """Returns a copy of ``spec`` with the blocks at the ``(stage, block)`` indices of ``new`` replaced."""
  stages = tuple(
      dataclasses.replace(st, blocks=tuple(new.get((i, j), b) for j, b in enumerate(st.blocks)))
      for i, st in enumerate(spec.stages))
  return dataclasses.replace(spec, stages=stages)


def with_stage(spec: ModelSpec, index: int, blocks: tuple[BlockSpec, ...]) -> ModelSpec:
  """Returns a copy of ``spec`` whose stage ``index`` holds ``blocks``."""
  stages = list(spec.stages)
  stages[index] = dataclasses.replace(stages[index], blocks=blocks)
  return dataclasses.replace(spec, stages=tuple(stages))


def with_head(spec: ModelSpec, index: int, **changes: Any) -> ModelSpec:
  """Returns a copy of ``spec`` with ``changes`` (``HeadSpec`` fields) applied to head ``index``."""
  heads = list(spec.heads)
  heads[index] = dataclasses.replace(heads[index], **changes)
  return dataclasses.replace(spec, heads=tuple(heads))


def check_expect(expect: int | None) -> None:
  """Raises ``ValueError`` unless ``expect`` (a selector's expected match count) is None or an int >= 0."""
  if expect is not None and (not isinstance(expect, int) or expect < 0):
    raise ValueError(f"expect must be a non-negative int or None, got {expect!r}")
