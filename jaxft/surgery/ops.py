"""The surgery ops: structural edits of a :class:`~jaxft.models.Model` as pure functions.

Every op has the shape ``op(model, …, *, seed=0, expect=None) -> Model`` and:

* never mutates ``model`` (nor its spec, variables, meta or history);
* edits the spec with ``dataclasses.replace`` and ends in :func:`~jaxft.surgery.rebuild.rebuild`, which
  shares — as the very same array objects — every leaf the op does not touch and takes new parameters
  from ``Network(new_spec).init`` (seeded by an integer ``seed``);
* appends one JSON-serialisable record ``{"op": name, "args": {...}}`` to ``model.history``, so
  :func:`~jaxft.surgery.history.replay` can rebuild the same structure on the base model.

Grafts (``append_blocks``, ``add_adapters``, ``add_head``) start out computing the model's function;
so do the training settings (``set_dropout``, ``set_bn_momentum``: eval mode is unchanged);
replacements (``replace_*``) and removals (``remove_*``, ``prune_channels``) change it
on purpose. A new op is written here and listed in ``__all__`` (which is what
:data:`~jaxft.surgery.history.REGISTRY` replays) and in ``jaxft.surgery``'s exports.
A selector that matches nothing or a number of blocks other than ``expect``, and an unknown stage, block
or head, raise :class:`~jaxft.paths.PathError` naming the nearest valid names.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models.layers import activation as _check_activation
from jaxft.models.model import Model
from jaxft.models.network import head_module_name
from jaxft.models.spec import BlockSpec, HeadSpec, ModelSpec
from jaxft.surgery.fold import require_bn
from jaxft.surgery.kinds import InnerGroup, block_kind
from jaxft.surgery.rebuild import op_record, rebuild
from jaxft.surgery.select import (block_index, block_inputs, check_expect, head_index, select_blocks,
                                  stage_index, with_blocks, with_head, with_stage)

logger = logging.getLogger(__name__)

# The ops (each records itself under its own name); everything else here is a helper.
__all__ = [
    "replace_head", "replace_activation", "replace_block", "replace_stage", "append_blocks",
    "add_adapters", "add_head", "set_dropout", "set_bn_momentum", "remove_stage", "remove_blocks",
    "prune_channels",
]


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
  i = head_index(model.spec, head)
  spec = with_head(model.spec, i, num_classes=int(num_classes))
  return rebuild(model, spec, op_record("replace_head", num_classes=int(num_classes), head=head,
                                        seed=seed),
                 seed=seed, targets=[head_module_name(head)])


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
  check_expect(expect)
  spec = model.spec
  if blocks is not None:
    sel = select_blocks(spec, blocks, expect)
    spec = with_blocks(spec, {(i, j): dataclasses.replace(spec.stages[i].blocks[j], act=act)
                              for i, j in sel})
  if stem:
    spec = dataclasses.replace(spec, stem=dataclasses.replace(spec.stem, act=act))
  if neck:
    spec = dataclasses.replace(spec, neck_act=act)
  return rebuild(model, spec, op_record("replace_activation", act=act, blocks=blocks, stem=stem,
                                        neck=neck, expect=expect))


def _check_option_a(spec: ModelSpec, what: str) -> None:
  """Raises ``ValueError`` naming the first block whose option-A shortcut would have to drop channels
  (its input is wider than its output): zero padding can only add them."""
  if spec.shortcut != "option_a":
    return
  cins = block_inputs(spec)
  for st in spec.stages:
    for b in st.blocks:
      name, cin = f"{st.name}/{b.name}", cins[f"{st.name}/{b.name}"]
      if b.kind != "mbconv" and cin > b.out:
        raise ValueError(f"{what} gives {name} {cin} input channels but it outputs {b.out}: its "
                         f"option-A shortcut (zero padding) cannot drop channels; give {name} out >= "
                         f"{cin} too (replace_block or replace_stage), or widen function-preservingly "
                         "with widen_stage")


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
    ValueError: unknown field, an attempt to rename the block, or (option-A ResNets) a new ``out``
      wider than the following block's, naming that block.
  """
  i, j = block_index(model.spec, block)
  old = model.spec.stages[i].blocks[j]
  if "name" in fields and fields["name"] != old.name:
    raise ValueError(f"replace_block keeps block names stable; cannot rename {block!r} to "
                     f"{fields['name']!r}")
  new = _make_block(dict(fields), **_block_dict(old))
  spec = with_blocks(model.spec, {(i, j): new})
  _check_option_a(spec, f"replace_block({block!r}, out={new.out})")
  return rebuild(model, spec, op_record("replace_block", block=block, fields=dict(fields), seed=seed),
                 seed=seed, targets=[block], allow_reinit=True)


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
  i = stage_index(model.spec, stage)
  new = tuple(_make_block(dict(f), name=f"block{k}") for k, f in enumerate(blocks))
  names = [b.name for b in new]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate block names in {names}")
  spec = with_stage(model.spec, i, new)
  return rebuild(model, spec,
                 op_record("replace_stage", stage=stage, blocks=[dict(f) for f in blocks], seed=seed),
                 seed=seed, targets=[stage], allow_reinit=True)


def _next_block_names(existing: Sequence[str], n: int) -> list[str]:
  nums = [int(m.group(1)) for m in (re.fullmatch(r"block(\d+)", s) for s in existing) if m]
  start = max(nums, default=len(existing) - 1) + 1
  return [f"block{start + k}" for k in range(n)]


def append_blocks(model: Model, stage: str, n: int = 1, *, seed: int = 0) -> Model:
  """Returns ``model`` with ``n`` new residual blocks at the end of ``stage``, computing the same function.

  Each new block copies the kind, widths, kernel, groups and activation of the stage's last block, with
  stride 1 and no adapter; its residual branch is closed by a BN whose scale is zero
  (``BlockKind.last_bn``), so the branch outputs 0. ``mbconv`` blocks then compute ``x``; post-activation
  ResNet blocks compute ``relu(0 + x) = x`` because ``x`` is the output of a ReLU. An adapter on the
  stage's last block (``add_adapters``) would break that (its output can be negative once trained), so
  it *moves*, weights and all, to the last new block: the stage still ends in the same adapter and the
  function is kept exactly. When the last block's activation is not a plain ReLU, ``act(0 + x) == x``
  fails and a warning says so.

  Args:
    model: never mutated.
    stage: stage name.
    n: number of blocks (>= 1); they are named ``block<k>`` after the highest existing index.
    seed: seeds the new blocks' convs.

  Raises:
    PathError: unknown stage.
    ValueError: ``n < 1``, an empty stage, a block kind surgery does not know, or a model whose BNs
      are folded (``fold_batchnorm``: there is no BN to zero).
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  require_bn(model, "append_blocks")
  i = stage_index(model.spec, stage)
  st = model.spec.stages[i]
  if not st.blocks:
    raise ValueError(f"stage {stage!r} has no block to copy")
  last = st.blocks[-1]
  kind = block_kind(last.kind)
  if last.kind != "mbconv" and last.act != "relu":
    logger.warning("append_blocks(%s): the last block ends in %s, so relu(0 + x) == x may not hold "
                   "and the graft may change the function", stage, last.act)
  names = _next_block_names([b.name for b in st.blocks], n)
  added = tuple(dataclasses.replace(last, name=nm, stride=1, adapter=0) for nm in names)
  targets = [f"{stage}/{nm}" for nm in names]
  # The zeroed BN scales are explicit values; the rest of each new block comes from init.
  values = {f"params/{t}/{kind.last_bn}/scale": jnp.zeros((last.out,), jnp.float32)
            for t in targets}
  if last.adapter:  # the adapter moves to the new end of the stage (see the docstring)
    added = added[:-1] + (dataclasses.replace(added[-1], adapter=last.adapter),)
    values.update(_moved_adapter(model, f"{stage}/{last.name}", targets[-1]))
  blocks = st.blocks[:-1] + (dataclasses.replace(last, adapter=0),) + added
  spec = with_stage(model.spec, i, blocks)
  return rebuild(model, spec, op_record("append_blocks", stage=stage, n=n, seed=seed), seed=seed,
                 targets=targets, values=values)


def _moved_adapter(model: Model, src: str, dst: str) -> dict[str, Any]:
  """The adapter leaves of block ``src`` keyed as those of block ``dst`` (the very same arrays)."""
  out = {}
  for p, v in paths.flatten(model.variables).items():
    coll, rest = p.split("/", 1)
    if rest.startswith(f"{src}/adapter/"):
      out[f"{coll}/{dst}/{rest[len(src) + 1:]}"] = v
  return out


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
  check_expect(expect)
  sel = select_blocks(model.spec, blocks, expect)
  spec = model.spec
  have = [f"{spec.stages[i].name}/{spec.stages[i].blocks[j].name}" for i, j in sel
          if spec.stages[i].blocks[j].adapter]
  if have:
    raise ValueError(f"blocks already have adapters: {have}")
  spec = with_blocks(spec, {(i, j): dataclasses.replace(spec.stages[i].blocks[j], adapter=width)
                            for i, j in sel})
  targets = [f"{spec.stages[i].name}/{spec.stages[i].blocks[j].name}/adapter" for i, j in sel]
  return rebuild(model, spec, op_record("add_adapters", blocks=blocks, width=width, expect=expect,
                                        seed=seed),
                 seed=seed, targets=targets)


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
  return rebuild(model, spec, op_record("add_head", name=name, num_classes=int(num_classes),
                                        dropout=float(dropout), seed=seed),
                 seed=seed, targets=[head_module_name(name)])


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")


def set_dropout(model: Model, rate: float, *, head: str = "head") -> Model:
  """Returns ``model`` with dropout ``rate`` before head ``head`` (active only in training).

  Raises:
    PathError: unknown head.
    ValueError: rate outside [0, 1).
  """
  _check_rate(rate)
  i = head_index(model.spec, head)
  spec = with_head(model.spec, i, dropout=float(rate))
  return rebuild(model, spec, op_record("set_dropout", rate=float(rate), head=head))


def set_bn_momentum(model: Model, momentum: float) -> Model:
  """Returns ``model`` whose BatchNorms update their running statistics with ``momentum`` in training.

  flax convention: ``running = momentum * running + (1 - momentum) * batch`` (torch's ``momentum=0.1``
  is 0.9 here). Every leaf is shared and the function (eval mode) is unchanged; only how fast the
  statistics follow the batches differs.

  Raises:
    ValueError: ``momentum`` outside [0, 1).
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"BatchNorm momentum must be in [0, 1) (flax convention: torch's 0.1 is 0.9), "
                     f"got {momentum}")
  spec = dataclasses.replace(model.spec, bn_momentum=float(momentum))
  return rebuild(model, spec, op_record("set_bn_momentum", momentum=float(momentum)))


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
  i = stage_index(model.spec, stage)
  if len(model.spec.stages) == 1:
    raise ValueError(f"cannot remove {stage!r}: it is the only stage")
  spec = dataclasses.replace(model.spec, stages=model.spec.stages[:i] + model.spec.stages[i + 1:])
  return rebuild(model, spec, op_record("remove_stage", stage=stage, seed=seed), seed=seed,
                 allow_reinit=True)


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
  check_expect(expect)
  spec = model.spec
  sel = select_blocks(spec, blocks, expect)
  cins = block_inputs(spec)
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
  return rebuild(model, dataclasses.replace(spec, stages=stages),
                 op_record("remove_blocks", blocks=blocks, expect=expect))


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


def prune_channels(model: Model, blocks: str = ".*", *, fraction: float | None = None,
                   keep: int | None = None, criterion: str = "l1",
                   expect: int | None = None,
                   indices: Mapping[str, Sequence[Sequence[int]]] | None = None) -> Model:
  """Returns ``model`` with the inner width of the selected blocks reduced (structured pruning).

  Only channels inside a block are removed (``BLOCK_KINDS[kind].inner``), so block interfaces and
  shortcuts stay: basic — conv1 out, bn1, conv2 in; bottleneck — the same plus conv2 out, bn2, conv3 in;
  mbconv — the expanded width (expand_conv out, bn0, depthwise, bn1, project_conv in). Each group keeps
  its best channels by ``criterion``, in their original order (ties keep the lower index), unless
  ``indices`` names them.

  The record stores the kept channels as ``indices``, so :func:`~jaxft.surgery.replay` keeps exactly
  the same channels on any weights (e.g. the base model after some training, where the criterion would
  rank them differently). Records written before ``indices`` existed still replay, by the criterion.

  Args:
    model: never mutated.
    blocks: regex over ``"<stage>/<block>"`` names.
    fraction: share of each block's inner channels to remove (rounded; at least one channel stays).
    keep: number of inner channels to keep instead.
    criterion: ``l1`` (L1 norm of the producing conv's filters) or ``bn_scale`` (``|scale|`` of the BN
      that feeds the consuming conv).
    expect: number of blocks ``blocks`` must match.
    indices: the channels to keep, ``{"<stage>/<block>": [[kept channels of each inner group], …]}``
      for every selected block (ascending, as the record stores them); ``fraction``/``keep`` may then
      be left out.

  Raises:
    PathError: the selector matches no block or not ``expect`` blocks.
    ValueError: both or neither of fraction/keep (without ``indices``), bad criterion, grouped convs
      (``groups > 1``), an ``mbconv`` without expansion or pruned to its input width, ``indices`` that
      do not fit the selected blocks, a model whose BNs are folded, a selected block with LoRA
      updates (``merge_lora`` first).
  """
  if criterion not in ("l1", "bn_scale"):
    raise ValueError(f"unknown criterion {criterion!r}; valid: l1, bn_scale")
  check_expect(expect)
  require_bn(model, "prune_channels")
  spec = model.spec
  sel = select_blocks(spec, blocks, expect)
  names = [f"{spec.stages[i].name}/{spec.stages[i].blocks[j].name}" for i, j in sel]
  given = _check_indices(indices, names)
  lora = [x.module for x in spec.lora if any(x.module.startswith(n + "/") for n in names)]
  if lora:
    raise ValueError(f"prune_channels: the selected blocks have LoRA updates on {lora}; "
                     "merge_lora first")
  cins = block_inputs(spec)
  old = paths.flatten(model.variables)
  values: dict[str, Any] = {}
  new_blocks, kept = {}, {}
  for (i, j), name in zip(sel, names):
    b = spec.stages[i].blocks[j]
    n_given = len(given[name][0]) if given and fraction is None and keep is None else None
    k = _pruned_width(b, name, cins[name], fraction, n_given if n_given is not None else keep)
    kept[name] = []
    for g, group in enumerate(block_kind(b.kind).inner):
      chosen = (_given_channels(given[name], g, len(block_kind(b.kind).inner), name, b.width, k)
                if given else _kept_channels(model.params, name, group, k, criterion))
      kept[name].append([int(c) for c in chosen])
      idx = jnp.asarray(chosen)
      for module, axis in group.slices:
        for coll in model.variables:
          prefix = f"{coll}/{name}/{module}/"
          for p in [p for p in old if p.startswith(prefix)]:
            # a leaf sliced by two groups (bottleneck conv2: in and out) is sliced twice
            values[p] = jnp.take(values.get(p, old[p]), idx, axis=axis)
    new_blocks[(i, j)] = dataclasses.replace(b, width=k)
  return rebuild(model, with_blocks(spec, new_blocks),
                 op_record("prune_channels", blocks=blocks, fraction=fraction, keep=keep,
                           criterion=criterion, expect=expect, indices=kept),
                 values=values)


def _check_indices(indices: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, Any] | None:
  """``indices`` as a plain dict after checking it names exactly the selected blocks ``names``."""
  if indices is None:
    return None
  indices = dict(indices)
  missing, extra = sorted(set(names) - set(indices)), sorted(set(indices) - set(names))
  if missing or extra:
    raise ValueError(f"prune_channels indices must name exactly the selected blocks {names}; "
                     + (f"missing {missing}" if missing else "") + ("; " if missing and extra else "")
                     + (f"not selected {extra}" if extra else ""))
  return indices


def _given_channels(groups: Sequence[Sequence[int]], g: int, n_groups: int, name: str, width: int,
                    k: int) -> np.ndarray:
  """The ``g``-th group of kept channels given for block ``name`` (inner ``width``, pruned to ``k``),
  checked: ``n_groups`` groups of ``k`` ascending channels in ``[0, width)``."""
  if len(groups) != n_groups:
    raise ValueError(f"prune_channels indices for {name}: {len(groups)} channel lists, the block has "
                     f"{n_groups} inner group(s)")
  idx = np.asarray(groups[g])
  ok = (idx.ndim == 1 and len(idx) == k and np.issubdtype(idx.dtype, np.integer)
        and (k == 0 or (idx[0] >= 0 and idx[-1] < width)) and bool(np.all(np.diff(idx) > 0)))
  if not ok:
    raise ValueError(f"prune_channels indices for {name}, group {g}: need {k} distinct ascending "
                     f"channel numbers in [0, {width}), got {list(groups[g])[:12]}")
  return idx


def _pruned_width(b: BlockSpec, name: str, cin: int, fraction: float | None, keep: int | None) -> int:
  """Returns the inner width block ``b`` (named ``name``, ``cin`` input channels) is pruned to.

  Raises:
    ValueError: grouped convs, an ``mbconv`` without expansion or pruned to its input width, or bad
      ``fraction`` / ``keep`` (see :func:`_keep_count`).
  """
  kind = block_kind(b.kind)
  if b.groups > 1:
    raise ValueError(f"cannot prune channels of {name}: grouped convs (groups={b.groups}) "
                     "would need whole groups removed")
  if kind.needs_expansion and b.width == cin:
    raise ValueError(f"cannot prune channels of {name}: it has no expansion conv (width == input "
                     "width)")
  k = _keep_count(b.width, fraction, keep)
  if kind.needs_expansion and k == cin:
    raise ValueError(f"cannot prune {name} to {k} channels: equal to its input width, the expansion "
                     "conv would disappear; choose another count")
  return k


def _kept_channels(params: Mapping[str, Any], name: str, group: InnerGroup, k: int,
                   criterion: str) -> np.ndarray:
  """Returns the indices of the ``k`` best channels of ``group`` in block ``name`` by ``criterion``,
  in their original order (ties keep the lower index)."""
  if criterion == "l1":
    w = np.asarray(paths.get(params, f"{name}/{group.producer}/kernel"))
    score = np.abs(w).reshape(-1, w.shape[-1]).sum(0)
  else:
    score = np.abs(np.asarray(paths.get(params, f"{name}/{group.bn}/scale")))
  return np.sort(np.argsort(-score, kind="stable")[:k])
