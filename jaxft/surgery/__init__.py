"""Structural edits of a :class:`~jaxft.models.Model` as pure functions.

Every op has the shape ``op(model, …, *, seed=0, expect=None) -> Model`` and:

* never mutates ``model`` (nor its spec, variables, meta or history);
* edits the spec with ``dataclasses.replace`` and builds new variable dicts that share — as the very
  same array objects — every leaf it does not touch;
* takes new parameters from ``Network(new_spec).init`` (seeded by an integer ``seed``), so surgery never
  duplicates model code: a new block kind works as soon as the network can build it and, for the ops that
  need to know which BN closes a residual branch or which channels are "inner", it is described in
  :data:`BLOCK_KINDS`;
* appends one JSON-serialisable record ``{"op": name, "args": {...}}`` to ``model.history``, so
  :func:`replay` can rebuild the same structure on the base model and :func:`apply_ops` can apply
  records written in a config.

Blocks are addressed as ``"<stage>/<block>"`` (``layer2/block1``); selectors are regexes matched against
whole block names (``jaxft.paths.glob`` turns shell patterns into them). A selector that matches nothing
or a number of blocks other than ``expect``, and an unknown stage, block or head, raise
:class:`~jaxft.paths.PathError` naming the nearest valid names.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models import conv as conv_lib
from jaxft.models.layers import activation as _check_activation
from jaxft.models.model import Model, init_flat
from jaxft.models.network import Network, head_module_name
from jaxft.models.spec import BlockSpec, HeadSpec, ModelSpec
from jaxft.paths import PathError

logger = logging.getLogger(__name__)

Record = dict[str, Any]

# Parameter shapes do not depend on the spatial size; a small input keeps abstract evaluation cheap.
_INIT_SIZE = 32


# ---------------------------------------------------------------------------------------------------
# What surgery needs to know about each block kind (plain data; extend it for a new kind).


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


@dataclasses.dataclass(frozen=True)
class BlockKind:
  """How surgery treats one block kind.

  Attributes:
    last_bn: the BN that closes the residual branch; zeroing its scale makes a new block the identity.
    inner: the prunable channel groups; all share ``BlockSpec.width``.
    needs_expansion: the inner width only exists when it differs from the input width (``mbconv``).
  """

  last_bn: str
  inner: tuple[InnerGroup, ...]
  needs_expansion: bool = False


BLOCK_KINDS: dict[str, BlockKind] = {
    "basic": BlockKind(
        last_bn="bn2",
        inner=(InnerGroup("conv1", "bn1", (("conv1", -1), ("bn1", 0), ("conv2", 2))),)),
    "bottleneck": BlockKind(
        last_bn="bn3",
        inner=(InnerGroup("conv1", "bn1", (("conv1", -1), ("bn1", 0), ("conv2", 2))),
               InnerGroup("conv2", "bn2", (("conv2", -1), ("bn2", 0), ("conv3", 2))))),
    "mbconv": BlockKind(
        last_bn="bn2",
        inner=(InnerGroup("expand_conv", "bn1", (("expand_conv", -1), ("bn0", 0),
                                                 ("depthwise_conv", -1), ("bn1", 0),
                                                 ("project_conv", 2))),),
        needs_expansion=True),
}


def _block_kind(kind: str) -> BlockKind:
  try:
    return BLOCK_KINDS[kind]
  except KeyError:
    raise ValueError(f"surgery does not know block kind {kind!r}; describe it in "
                     f"jaxft.surgery.BLOCK_KINDS (known: {sorted(BLOCK_KINDS)})") from None


# ---------------------------------------------------------------------------------------------------
# Addressing stages, blocks and heads in a spec.


def block_names(spec: ModelSpec) -> list[str]:
  """Returns every block as ``"<stage>/<block>"``, in network order."""
  return [f"{st.name}/{b.name}" for st in spec.stages for b in st.blocks]


def _index(names: Sequence[str], name: str, what: str) -> int:
  """Position of ``name`` in ``names``; raises PathError naming the nearest valid ``what``s."""
  if name in names:
    return list(names).index(name)
  raise PathError(f"no {what} {name!r}; nearest valid {what}s: {paths.nearest(name, names)}")


def _stage_index(spec: ModelSpec, stage: str) -> int:
  return _index([st.name for st in spec.stages], stage, "stage")


def _block_index(spec: ModelSpec, block: str) -> tuple[int, int]:
  for i, st in enumerate(spec.stages):
    for j, b in enumerate(st.blocks):
      if f"{st.name}/{b.name}" == block:
        return i, j
  raise PathError(f"no block {block!r}; nearest valid blocks: "
                  f"{paths.nearest(block, block_names(spec))}")


def _select_blocks(spec: ModelSpec, blocks: str, expect: int | None) -> list[tuple[int, int]]:
  hits = set(paths.select(block_names(spec), blocks, expect))
  return [(i, j) for i, st in enumerate(spec.stages) for j, b in enumerate(st.blocks)
          if f"{st.name}/{b.name}" in hits]


def _head_index(spec: ModelSpec, head: str) -> int:
  return _index([h.name for h in spec.heads], head, "head")


def _block_inputs(spec: ModelSpec) -> dict[str, int]:
  """Input width of every block (``"<stage>/<block>"`` → channels)."""
  cin = spec.stem.width
  out = {}
  for st in spec.stages:
    for b in st.blocks:
      out[f"{st.name}/{b.name}"] = cin
      cin = b.out
  return out


def _with_blocks(spec: ModelSpec, new: Mapping[tuple[int, int], BlockSpec]) -> ModelSpec:
  stages = tuple(
      dataclasses.replace(st, blocks=tuple(new.get((i, j), b) for j, b in enumerate(st.blocks)))
      for i, st in enumerate(spec.stages))
  return dataclasses.replace(spec, stages=stages)


def _with_stage(spec: ModelSpec, index: int, blocks: tuple[BlockSpec, ...]) -> ModelSpec:
  stages = list(spec.stages)
  stages[index] = dataclasses.replace(stages[index], blocks=blocks)
  return dataclasses.replace(spec, stages=tuple(stages))


def _with_head(spec: ModelSpec, index: int, **changes: Any) -> ModelSpec:
  heads = list(spec.heads)
  heads[index] = dataclasses.replace(heads[index], **changes)
  return dataclasses.replace(spec, heads=tuple(heads))


def _check_expect(expect: int | None) -> None:
  if expect is not None and (not isinstance(expect, int) or expect < 0):
    raise ValueError(f"expect must be a non-negative int or None, got {expect!r}")


# ---------------------------------------------------------------------------------------------------
# Building the new variables: share what is unchanged, init what is new.


def _abstract(spec: ModelSpec) -> dict[str, jax.ShapeDtypeStruct]:
  """``{"<collection>/<path>": ShapeDtypeStruct}`` of ``Network(spec)``, without computing anything."""
  net = Network(spec)
  x = jax.ShapeDtypeStruct((1, _INIT_SIZE, _INIT_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(lambda r, x: net.init(r, x, train=False), jax.random.key(0), x)
  return paths.flatten({k: dict(v) for k, v in tree.items()})


def _init_leaves(spec: ModelSpec, seed: int, wanted: Sequence[str]) -> dict[str, jax.Array]:
  """Initial values of the leaves ``wanted`` of ``Network(spec)`` under ``seed`` (only those are computed:
  initialising a whole ResNet-50 to keep a 10-class head would cost seconds)."""
  return init_flat(spec, jax.random.key(seed), list(wanted), input_size=_INIT_SIZE)


def _module_of(leaf_path: str) -> str:
  """``params/layer1/block0/conv1/kernel`` → ``layer1/block0/conv1``."""
  return leaf_path.split("/", 1)[1].rsplit("/", 1)[0]


def _under(module: str, prefixes: Iterable[str]) -> bool:
  return any(module == p or module.startswith(p + "/") for p in prefixes)


def _rebuild(model: Model, spec: ModelSpec, record: Record, *, seed: int = 0,
             targets: Sequence[str] = (), values: Mapping[str, Any] | None = None,
             allow_reinit: bool = False) -> Model:
  """Returns ``model`` with structure ``spec`` and ``record`` appended to its history.

  Each leaf of ``Network(spec)`` gets, in order of precedence: the array in ``values`` (keyed by
  ``"<collection>/<path>"``); a fresh init if its module lies under one of ``targets`` (the modules the op
  creates or re-initialises on purpose); the old leaf object itself if it has the same shape. A module
  with any other leaf (new, or reshaped by a change upstream) is re-initialised as a whole when
  ``allow_reinit`` — the record lists it under ``"reinitialised"`` and a warning is logged — and is an
  error otherwise. ``model`` is never mutated.
  """
  new = _abstract(spec)
  old = paths.flatten(model.variables)
  values = dict(values or {})
  unknown = sorted(set(values) - set(new))
  if unknown:
    raise AssertionError(f"surgery bug: values for leaves the new network lacks: {unknown}")
  fresh = {p for p in new if p not in values and _under(_module_of(p), targets)}
  stray = {p for p in new
           if p not in values and p not in fresh
           and (p not in old or tuple(np.shape(old[p])) != new[p].shape)}
  reinit = sorted({_module_of(p) for p in stray})
  if reinit and not allow_reinit:
    raise AssertionError(f"surgery bug: {record['op']} changed leaves outside its targets: "
                         f"{sorted(stray)}")
  fresh |= {p for p in new if p not in values and _under(_module_of(p), reinit)}
  out: dict[str, Any] = {}
  for p, sds in new.items():
    if p in values:
      if tuple(np.shape(values[p])) != sds.shape:
        raise AssertionError(f"surgery bug: {p} has shape {np.shape(values[p])}, the network "
                             f"expects {sds.shape}")
      out[p] = values[p]
    elif p not in fresh:
      out[p] = old[p]
  if fresh:
    out.update(_init_leaves(spec, seed, sorted(fresh)))
  if reinit:
    record = dict(record, reinitialised=reinit)
    logger.warning("%s re-initialised %s: their input or output shape changed", record["op"],
                   ", ".join(reinit))
  variables = paths.unflatten(out)
  for coll in model.variables:  # keep an empty collection (e.g. no BN) present, as init returns it
    variables.setdefault(coll, {})
  return model.replace(spec=spec, variables=variables, history=tuple(model.history) + (record,))


# ---------------------------------------------------------------------------------------------------
# The ops. Each is registered by name for replay / apply_ops.

REGISTRY: dict[str, Callable[..., Model]] = {}


def _op(fn: Callable[..., Model]) -> Callable[..., Model]:
  REGISTRY[fn.__name__] = fn
  return fn


def _record(op: str, **args: Any) -> Record:
  return {"op": op, "args": args}


def _block_dict(b: BlockSpec) -> dict[str, Any]:
  return dataclasses.asdict(b)


def _make_block(fields: Mapping[str, Any], **defaults: Any) -> BlockSpec:
  valid = [f.name for f in dataclasses.fields(BlockSpec)]
  bad = sorted(set(fields) - set(valid))
  if bad:
    raise ValueError(f"unknown BlockSpec fields {bad}; valid: {valid}")
  try:
    return BlockSpec(**{**defaults, **fields})
  except TypeError as e:
    raise ValueError(f"incomplete block {dict(fields)}: {e}") from None


@_op
def replace_head(model: Model, num_classes: int, *, head: str = "head", seed: int = 0) -> Model:
  """Returns ``model`` with head ``head`` re-initialised for ``num_classes`` classes.

  Args:
    model: never mutated.
    num_classes: classes of the new head.
    head: which head (``head`` is the main one; extra heads by the name given to :func:`add_head`).
    seed: seeds the new head's initialisation.

  Returns:
    A new Model sharing every leaf outside the head.

  Raises:
    PathError: unknown head (naming the nearest).
    ValueError: ``num_classes < 1``.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  i = _head_index(model.spec, head)
  spec = _with_head(model.spec, i, num_classes=int(num_classes))
  return _rebuild(model, spec, _record("replace_head", num_classes=int(num_classes), head=head,
                                       seed=seed),
                  seed=seed, targets=[head_module_name(head)])


@_op
def replace_activation(model: Model, act: str, *, blocks: str | None = ".*", stem: bool = False,
                       neck: bool = False, expect: int | None = None) -> Model:
  """Returns ``model`` with activation ``act`` in the selected blocks (and optionally stem / neck).

  Parameters are unchanged (every leaf is shared); the function changes unless ``act`` equals the old one.

  Args:
    model: never mutated.
    act: a name in ``jaxft.models.layers.ACTIVATIONS`` (``gelu``, ``silu`` …).
    blocks: regex over ``"<stage>/<block>"`` names; ``None`` selects no block.
    stem: also the stem's activation.
    neck: also the neck's activation (networks with a neck conv).
    expect: number of blocks ``blocks`` must match.

  Raises:
    ValueError: unknown activation.
    PathError: the selector matches no block or not ``expect`` blocks.
  """
  _check_activation(act)
  _check_expect(expect)
  spec = model.spec
  if blocks is not None:
    sel = _select_blocks(spec, blocks, expect)
    spec = _with_blocks(spec, {(i, j): dataclasses.replace(spec.stages[i].blocks[j], act=act)
                               for i, j in sel})
  if stem:
    spec = dataclasses.replace(spec, stem=dataclasses.replace(spec.stem, act=act))
  if neck:
    spec = dataclasses.replace(spec, neck_act=act)
  return _rebuild(model, spec, _record("replace_activation", act=act, blocks=blocks, stem=stem,
                                       neck=neck, expect=expect))


@_op
def replace_block(model: Model, block: str, fields: Mapping[str, Any], *, seed: int = 0) -> Model:
  """Returns ``model`` with block ``block`` rebuilt from its spec updated by ``fields``.

  The block is re-initialised as a whole. If its output width changes, the downstream modules whose
  shapes change (the next block's first convs, the head …) are re-initialised too; the record lists them
  under ``"reinitialised"`` and a warning is logged.

  Args:
    model: never mutated.
    block: ``"<stage>/<block>"``.
    fields: ``BlockSpec`` fields to change (``kind``, ``width``, ``out``, ``stride``, ``kernel``,
      ``groups``, ``act``, ``adapter``); the name stays.
    seed: seeds the new parameters.

  Raises:
    PathError: unknown block.
    ValueError: unknown field, or an attempt to rename the block.
  """
  i, j = _block_index(model.spec, block)
  old = model.spec.stages[i].blocks[j]
  if "name" in fields and fields["name"] != old.name:
    raise ValueError(f"replace_block keeps block names stable; cannot rename {block!r} to "
                     f"{fields['name']!r}")
  new = _make_block(dict(fields), **_block_dict(old))
  spec = _with_blocks(model.spec, {(i, j): new})
  return _rebuild(model, spec, _record("replace_block", block=block, fields=dict(fields), seed=seed),
                  seed=seed, targets=[block], allow_reinit=True)


@_op
def replace_stage(model: Model, stage: str, blocks: Sequence[Mapping[str, Any]], *,
                  seed: int = 0) -> Model:
  """Returns ``model`` with every block of ``stage`` replaced by new, freshly initialised blocks.

  Downstream modules whose shapes change are re-initialised and listed under ``"reinitialised"``.

  Args:
    model: never mutated.
    stage: stage name.
    blocks: one dict of ``BlockSpec`` fields per new block (``kind``, ``width``, ``out`` required);
      ``name`` defaults to ``block<i>``.
    seed: seeds the new parameters.

  Raises:
    PathError: unknown stage.
    ValueError: unknown or missing fields, duplicate names.
  """
  i = _stage_index(model.spec, stage)
  new = tuple(_make_block(dict(f), name=f"block{k}") for k, f in enumerate(blocks))
  names = [b.name for b in new]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate block names in {names}")
  spec = _with_stage(model.spec, i, new)
  return _rebuild(model, spec,
                  _record("replace_stage", stage=stage, blocks=[dict(f) for f in blocks], seed=seed),
                  seed=seed, targets=[stage], allow_reinit=True)


def _next_block_names(existing: Sequence[str], n: int) -> list[str]:
  nums = [int(m.group(1)) for m in (re.fullmatch(r"block(\d+)", s) for s in existing) if m]
  start = max(nums, default=len(existing) - 1) + 1
  return [f"block{start + k}" for k in range(n)]


@_op
def append_blocks(model: Model, stage: str, n: int = 1, *, seed: int = 0) -> Model:
  """Returns ``model`` with ``n`` new residual blocks at the end of ``stage``, computing the same function.

  Each new block copies the kind, widths, kernel, groups and activation of the stage's last block, with
  stride 1 and no adapter; its residual branch is closed by a BN whose scale is zero
  (``BlockKind.last_bn``), so the branch outputs 0. ``mbconv`` blocks then compute ``x``; post-activation
  ResNet blocks compute ``relu(0 + x) = x`` because ``x`` is the output of a ReLU. When the stage's last
  block does not end in a plain ReLU (another activation, or an adapter) that argument fails and a
  warning says so.

  Args:
    model: never mutated.
    stage: stage name.
    n: number of blocks (>= 1); they are named ``block<k>`` after the highest existing index.
    seed: seeds the new blocks' convs.

  Raises:
    PathError: unknown stage.
    ValueError: ``n < 1``, an empty stage, or a block kind surgery does not know.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  i = _stage_index(model.spec, stage)
  st = model.spec.stages[i]
  if not st.blocks:
    raise ValueError(f"stage {stage!r} has no block to copy")
  last = st.blocks[-1]
  kind = _block_kind(last.kind)
  if last.kind != "mbconv" and (last.act != "relu" or last.adapter):
    logger.warning("append_blocks(%s): the last block ends in %s%s, so relu(0 + x) == x may not "
                   "hold and the graft may change the function", stage, last.act,
                   " + adapter" if last.adapter else "")
  names = _next_block_names([b.name for b in st.blocks], n)
  added = tuple(dataclasses.replace(last, name=nm, stride=1, adapter=0) for nm in names)
  spec = _with_stage(model.spec, i, st.blocks + added)
  targets = [f"{stage}/{nm}" for nm in names]
  # The zeroed BN scales are explicit values; the rest of each new block comes from init.
  values = {f"params/{t}/{kind.last_bn}/scale": jnp.zeros((last.out,), jnp.float32)
            for t in targets}
  return _rebuild(model, spec, _record("append_blocks", stage=stage, n=n, seed=seed), seed=seed,
                  targets=targets, values=values)


@_op
def add_adapters(model: Model, blocks: str = ".*", *, width: int, expect: int | None = None,
                 seed: int = 0) -> Model:
  """Returns ``model`` with a residual 1×1 bottleneck adapter after each selected block.

  The adapter's ``up`` conv starts at zero, so the model computes the same function.

  Args:
    model: never mutated.
    blocks: regex over ``"<stage>/<block>"`` names.
    width: bottleneck width of each adapter (>= 1).
    expect: number of blocks ``blocks`` must match.
    seed: seeds the adapters' ``down`` convs.

  Raises:
    PathError: the selector matches no block or not ``expect`` blocks.
    ValueError: ``width < 1`` or a selected block already has an adapter.
  """
  if width < 1:
    raise ValueError(f"adapter width must be >= 1, got {width}")
  _check_expect(expect)
  sel = _select_blocks(model.spec, blocks, expect)
  spec = model.spec
  have = [f"{spec.stages[i].name}/{spec.stages[i].blocks[j].name}" for i, j in sel
          if spec.stages[i].blocks[j].adapter]
  if have:
    raise ValueError(f"blocks already have adapters: {have}")
  spec = _with_blocks(spec, {(i, j): dataclasses.replace(spec.stages[i].blocks[j], adapter=width)
                             for i, j in sel})
  targets = [f"{spec.stages[i].name}/{spec.stages[i].blocks[j].name}/adapter" for i, j in sel]
  return _rebuild(model, spec, _record("add_adapters", blocks=blocks, width=width, expect=expect,
                                       seed=seed),
                  seed=seed, targets=targets)


@_op
def add_head(model: Model, name: str, num_classes: int, *, dropout: float = 0.0,
             seed: int = 0) -> Model:
  """Returns ``model`` with an extra classifier ``head_<name>`` on the pooled features (multi-task).

  The main logits are unchanged; ``model.apply(x, return_all=True)["heads"][name]`` gives the new ones.

  Args:
    model: never mutated.
    name: the head's name (letters, digits, ``_``; not ``head`` nor an existing head).
    num_classes: classes (>= 1).
    dropout: dropout rate before the head.
    seed: seeds the head.

  Raises:
    ValueError: bad or taken name, ``num_classes < 1``, bad dropout.
  """
  if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "head":
    raise ValueError(f"head name must be letters, digits or '_' and not 'head', got {name!r}")
  if name in [h.name for h in model.spec.heads]:
    raise ValueError(f"head {name!r} already exists")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  _check_rate(dropout)
  spec = dataclasses.replace(model.spec, heads=model.spec.heads + (
      HeadSpec(name, int(num_classes), float(dropout)),))
  return _rebuild(model, spec, _record("add_head", name=name, num_classes=int(num_classes),
                                       dropout=float(dropout), seed=seed),
                  seed=seed, targets=[head_module_name(name)])


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")


@_op
def set_dropout(model: Model, rate: float, *, head: str = "head") -> Model:
  """Returns ``model`` with dropout ``rate`` before head ``head`` (active only in training).

  Raises:
    PathError: unknown head.
    ValueError: rate outside [0, 1).
  """
  _check_rate(rate)
  i = _head_index(model.spec, head)
  spec = _with_head(model.spec, i, dropout=float(rate))
  return _rebuild(model, spec, _record("set_dropout", rate=float(rate), head=head))


@_op
def remove_stage(model: Model, stage: str, *, seed: int = 0) -> Model:
  """Returns ``model`` without ``stage``.

  Modules whose shapes no longer fit are re-initialised: removing the last stage changes the feature
  width, so the head (and a neck conv) is re-fitted from scratch; removing a middle stage re-initialises
  the first convs of the next stage. They are listed under ``"reinitialised"`` in the record and a
  warning is logged.

  Args:
    model: never mutated.
    stage: stage name.
    seed: seeds the re-initialised modules.

  Raises:
    PathError: unknown stage.
    ValueError: removing the only stage.
  """
  i = _stage_index(model.spec, stage)
  if len(model.spec.stages) == 1:
    raise ValueError(f"cannot remove {stage!r}: it is the only stage")
  spec = dataclasses.replace(model.spec, stages=model.spec.stages[:i] + model.spec.stages[i + 1:])
  return _rebuild(model, spec, _record("remove_stage", stage=stage, seed=seed), seed=seed,
                  allow_reinit=True)


@_op
def remove_blocks(model: Model, blocks: str, *, expect: int | None = None) -> Model:
  """Returns ``model`` without the selected blocks; all other leaves are shared.

  Only blocks that keep shapes (stride 1 and input width == output width) can be removed; the others are
  identity-shaped, so the network stays valid (its function changes, of course).

  Args:
    model: never mutated.
    blocks: regex over ``"<stage>/<block>"`` names.
    expect: number of blocks ``blocks`` must match.

  Raises:
    PathError: the selector matches no block or not ``expect`` blocks.
    ValueError: a selected block changes the shape (the message says how).
  """
  _check_expect(expect)
  spec = model.spec
  sel = _select_blocks(spec, blocks, expect)
  cins = _block_inputs(spec)
  bad = []
  for i, j in sel:
    b = spec.stages[i].blocks[j]
    name = f"{spec.stages[i].name}/{b.name}"
    if b.stride != 1 or cins[name] != b.out:
      bad.append(f"{name} (stride {b.stride}, {cins[name]}→{b.out} channels)")
  if bad:
    raise ValueError(f"cannot remove {', '.join(bad)}: removing a block that changes the shape would "
                     "break the next layer; only blocks with stride 1 and equal input and output "
                     "widths can be removed")
  drop = set(sel)
  stages = tuple(dataclasses.replace(st, blocks=tuple(b for j, b in enumerate(st.blocks)
                                                      if (i, j) not in drop))
                 for i, st in enumerate(spec.stages))
  return _rebuild(model, dataclasses.replace(spec, stages=stages),
                  _record("remove_blocks", blocks=blocks, expect=expect))


def _keep_count(width: int, fraction: float | None, keep: int | None) -> int:
  if (fraction is None) == (keep is None):
    raise ValueError("give exactly one of fraction= (share of channels to remove) or keep= "
                     "(channels to keep)")
  if fraction is not None:
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    return max(1, width - int(round(fraction * width)))
  if not 1 <= keep <= width:
    raise ValueError(f"keep must be in [1, {width}], got {keep}")
  return int(keep)


@_op
def prune_channels(model: Model, blocks: str = ".*", *, fraction: float | None = None,
                   keep: int | None = None, criterion: str = "l1",
                   expect: int | None = None) -> Model:
  """Returns ``model`` with the inner width of the selected blocks reduced (structured pruning).

  Only channels inside a block are removed (``BLOCK_KINDS[kind].inner``), so block interfaces and
  shortcuts stay: basic — conv1 out, bn1, conv2 in; bottleneck — the same plus conv2 out, bn2, conv3 in;
  mbconv — the expanded width (expand_conv out, bn0, depthwise, bn1, project_conv in). Each group keeps
  its best channels by ``criterion``, in their original order (ties keep the lower index).

  Args:
    model: never mutated.
    blocks: regex over ``"<stage>/<block>"`` names.
    fraction: share of each block's inner channels to remove (rounded; at least one channel stays).
    keep: number of inner channels to keep instead.
    criterion: ``l1`` (L1 norm of the producing conv's filters) or ``bn_scale`` (``|scale|`` of the BN
      that feeds the consuming conv).
    expect: number of blocks ``blocks`` must match.

  Raises:
    PathError: the selector matches no block or not ``expect`` blocks.
    ValueError: both or neither of fraction/keep, bad criterion, grouped convs (``groups > 1``), an
      ``mbconv`` without expansion or pruned to its input width.
  """
  if criterion not in ("l1", "bn_scale"):
    raise ValueError(f"unknown criterion {criterion!r}; valid: l1, bn_scale")
  _check_expect(expect)
  spec = model.spec
  sel = _select_blocks(spec, blocks, expect)
  cins = _block_inputs(spec)
  params = model.params
  old = paths.flatten(model.variables)
  values: dict[str, Any] = {}
  new_blocks = {}
  for i, j in sel:
    b = spec.stages[i].blocks[j]
    name = f"{spec.stages[i].name}/{b.name}"
    kind = _block_kind(b.kind)
    if b.groups > 1:
      raise ValueError(f"cannot prune channels of {name}: grouped convs (groups={b.groups}) "
                       "would need whole groups removed")
    if kind.needs_expansion and b.width == cins[name]:
      raise ValueError(f"cannot prune channels of {name}: it has no expansion conv (width == input "
                       "width)")
    k = _keep_count(b.width, fraction, keep)
    if kind.needs_expansion and k == cins[name]:
      raise ValueError(f"cannot prune {name} to {k} channels: equal to its input width, the expansion "
                       "conv would disappear; choose another count")
    for group in kind.inner:
      if criterion == "l1":
        w = np.asarray(paths.get(params, f"{name}/{group.producer}/kernel"))
        score = np.abs(w).reshape(-1, w.shape[-1]).sum(0)
      else:
        score = np.abs(np.asarray(paths.get(params, f"{name}/{group.bn}/scale")))
      idx = np.sort(np.argsort(-score, kind="stable")[:k])
      for module, axis in group.slices:
        for coll in model.variables:
          prefix = f"{coll}/{name}/{module}/"
          for p in [p for p in old if p.startswith(prefix)]:
            # a leaf sliced by two groups (bottleneck conv2: in and out) is sliced twice
            values[p] = jnp.take(values.get(p, old[p]), jnp.asarray(idx), axis=axis)
    new_blocks[(i, j)] = dataclasses.replace(b, width=k)
  return _rebuild(model, _with_blocks(spec, new_blocks),
                  _record("prune_channels", blocks=blocks, fraction=fraction, keep=keep,
                          criterion=criterion, expect=expect),
                  values=values)


# ---------------------------------------------------------------------------------------------------
# Measuring.


def count_params(model: Model) -> int:
  """Number of trainable parameters (the ``params`` collection; BN running statistics excluded)."""
  return int(sum(np.size(v) for v in paths.flatten(model.params).values()))


def count_flops(model: Model, input_size: int | None = None) -> int:
  """FLOPs of one eval-mode forward pass of a batch of one ``input_size``² image.

  Counted by XLA's cost analysis of the lowered (unoptimised) forward pass with plain ``lax.conv``
  convolutions (whatever the backend would run: the custom calls of the oneDNN path have no cost
  model), so any architecture the network can build is covered; a multiply-add counts 2, and BN,
  activations and pooling are included. Nothing is executed.

  Args:
    model: never mutated.
    input_size: image side; default ``model.meta["input_size"]``, else 224.
  """
  size = int(input_size or model.meta.get("input_size") or 224)
  net = Network(model.spec)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                          model.variables)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  with conv_lib.impl_scope("lax"):  # the implementation is fixed when the function is traced
    lowered = jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(abstract, x)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return int(cost["flops"])


@dataclasses.dataclass(frozen=True)
class Report:
  """Parameters and FLOPs of two models (plain data; ``str()`` is a small table)."""

  params_before: int
  params_after: int
  flops_before: int
  flops_after: int
  input_size: int

  def to_dict(self) -> dict[str, int]:
    """The fields as a plain dict."""
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    def row(name: str, a: int, b: int) -> str:
      pct = f"{100.0 * (b - a) / a:+.1f}%" if a else "n/a"
      return f"{name:<8s} {a:>16,d} {b:>16,d} {pct:>8s}"
    return "\n".join([f"{'':<8s} {'before':>16s} {'after':>16s} {'change':>8s}",
                      row("params", self.params_before, self.params_after),
                      row(f"FLOPs@{self.input_size}", self.flops_before, self.flops_after)])


def report(before: Model, after: Model, input_size: int | None = None) -> Report:
  """Parameters and FLOPs (see :func:`count_flops`) of ``before`` and ``after``; neither is mutated."""
  size = int(input_size or before.meta.get("input_size") or 224)
  return Report(count_params(before), count_params(after), count_flops(before, size),
                count_flops(after, size), size)


# ---------------------------------------------------------------------------------------------------
# Diff.


@dataclasses.dataclass(frozen=True)
class DiffResult:
  """What changed between two models' variables, as plain data.

  Leaves are named ``"<collection>/<path>"``. Entries are dicts: ``added`` / ``removed`` —
  ``{"path", "shape", "size"}``; ``reshaped`` — ``{"path", "before", "after", "size_before",
  "size_after"}``; ``unchanged`` (same shape) — ``{"path", "shape", "size", "modified"}`` where
  ``modified`` says the values differ. ``ops`` are the history records ``after`` has beyond ``before``.
  """

  added: list[dict[str, Any]]
  removed: list[dict[str, Any]]
  reshaped: list[dict[str, Any]]
  unchanged: list[dict[str, Any]]
  ops: list[dict[str, Any]]
  params_before: int
  params_after: int

  @property
  def modified(self) -> list[dict[str, Any]]:
    """The same-shaped leaves whose values differ."""
    return [e for e in self.unchanged if e["modified"]]

  @property
  def num_modified(self) -> int:
    """How many same-shaped leaves have different values."""
    return len(self.modified)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain (JSON-serialisable) dict."""
    return dataclasses.asdict(self)

  def format(self, max_rows: int = 20) -> str:
    """A table of counts, then the changed leaves (at most ``max_rows`` per section)."""
    def size(entries: list[dict[str, Any]], key: str = "size") -> int:
      return sum(e[key] for e in entries)
    ops = "; ".join(f"{r['op']}({', '.join(f'{k}={v!r}' for k, v in r.get('args', {}).items())})"
                    for r in self.ops) or "(none recorded)"
    lines = [f"ops: {ops}",
             f"params: {self.params_before:,d} -> {self.params_after:,d} "
             f"({self.params_after - self.params_before:+,d})",
             f"{'':<10s} {'leaves':>7s} {'values':>12s}",
             f"{'added':<10s} {len(self.added):>7d} {size(self.added):>12,d}",
             f"{'removed':<10s} {len(self.removed):>7d} {size(self.removed):>12,d}",
             f"{'reshaped':<10s} {len(self.reshaped):>7d} "
             f"{size(self.reshaped, 'size_after') - size(self.reshaped, 'size_before'):>+12,d}",
             f"{'unchanged':<10s} {len(self.unchanged):>7d} {size(self.unchanged):>12,d}"
             f"  ({self.num_modified} with modified values)"]
    sections = [("+", self.added, lambda e: f"{tuple(e['shape'])}"),
                ("-", self.removed, lambda e: f"{tuple(e['shape'])}"),
                ("~", self.reshaped, lambda e: f"{tuple(e['before'])} -> {tuple(e['after'])}"),
                ("*", self.modified, lambda e: f"{tuple(e['shape'])} values changed")]
    for mark, entries, fmt in sections:
      for e in entries[:max_rows]:
        lines.append(f"  {mark} {e['path']:<48s} {fmt(e)}")
      if len(entries) > max_rows:
        lines.append(f"  {mark} … {len(entries) - max_rows} more")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format()


def _same_values(a: Any, b: Any) -> bool:
  return a is b or bool(np.array_equal(np.asarray(a), np.asarray(b)))


def diff(before: Model, after: Model) -> DiffResult:
  """Compares the variables of two models leaf by leaf; neither is mutated."""
  a, b = paths.flatten(before.variables), paths.flatten(after.variables)
  shape = lambda v: [int(s) for s in np.shape(v)]
  added = [{"path": p, "shape": shape(b[p]), "size": int(np.size(b[p]))} for p in b if p not in a]
  removed = [{"path": p, "shape": shape(a[p]), "size": int(np.size(a[p]))} for p in a if p not in b]
  reshaped, unchanged = [], []
  for p in a:
    if p not in b:
      continue
    if np.shape(a[p]) != np.shape(b[p]):
      reshaped.append({"path": p, "before": shape(a[p]), "after": shape(b[p]),
                       "size_before": int(np.size(a[p])), "size_after": int(np.size(b[p]))})
    else:
      unchanged.append({"path": p, "shape": shape(a[p]), "size": int(np.size(a[p])),
                        "modified": not _same_values(a[p], b[p])})
  n = len(before.history)
  ops = [dict(r) for r in after.history[n:]] if tuple(after.history[:n]) == tuple(
      before.history) else [dict(r) for r in after.history]
  return DiffResult(added, removed, reshaped, unchanged, ops, count_params(before),
                    count_params(after))


# ---------------------------------------------------------------------------------------------------
# Evolution log.


def _lookup_op(name: Any) -> Callable[..., Model]:
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown surgery op {name!r}; valid ops: {sorted(REGISTRY)}") from None


def _call(name: str, model: Model, args: Mapping[str, Any]) -> Model:
  fn = _lookup_op(name)
  params = list(inspect.signature(fn).parameters)[1:]
  bad = sorted(set(args) - set(params))
  if bad:
    raise ValueError(f"op {name!r} has no arguments {bad}; valid: {params}")
  try:
    return fn(model, **args)
  except TypeError as e:
    raise ValueError(f"op {name!r}: {e}") from None


def _plain(x: Any) -> Any:
  if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
    x = x.to_dict()
  return x


def replay(base: Model, history: Iterable[Mapping[str, Any]]) -> Model:
  """Re-applies history records (``{"op", "args"}``, oldest first) to ``base``.

  Given the records a model accumulated since ``base`` (``model.history[len(base.history):]``), it
  rebuilds the same spec and tree structure; ops that are deterministic given their seed and the base
  weights rebuild the same values. Records may have been through JSON. Extra keys of a record (such as
  ``reinitialised``) are ignored.

  Raises:
    ValueError: an unknown op (listing the valid ones) or arguments it does not take.
  """
  model = base
  for rec in history:
    rec = _plain(rec)
    model = _call(rec.get("op"), model, dict(_plain(rec.get("args", {}))))
  return model


def apply_ops(model: Model, ops: Iterable[Mapping[str, Any]]) -> Model:
  """Applies ops written as config dicts, e.g. ``[{"op": "replace_head", "num_classes": 10}]``.

  Each dict names the op under ``"op"``; its other keys are the op's arguments. ``model`` is never
  mutated; the result's history records each op.

  Raises:
    ValueError: an unknown op (listing the valid ones), a missing ``"op"``, or bad arguments.
  """
  for spec in ops:
    spec = dict(_plain(spec))
    if "op" not in spec:
      raise ValueError(f"op dict {spec} has no 'op' key; valid ops: {sorted(REGISTRY)}")
    name = spec.pop("op")
    model = _call(name, model, spec)
  return model


__all__ = [
    "BLOCK_KINDS", "BlockKind", "DiffResult", "InnerGroup", "PathError", "REGISTRY", "Report",
    "add_adapters", "add_head", "append_blocks", "apply_ops", "block_names", "count_flops",
    "count_params", "diff", "prune_channels", "remove_blocks", "remove_stage", "replace_activation",
    "replace_block", "replace_head", "replace_stage", "replay", "report", "set_dropout",
]
