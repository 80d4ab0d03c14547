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
