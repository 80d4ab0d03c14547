"""The optimizer builder: an optax chain over the *trainable* subtree, built from ``config.optim``.

What :func:`build_optimizer` returns (an :class:`Optimizer`) is all a train step needs::

  opt = build_optimizer(cfg.optim, params, spec=model.spec, total_steps=n)
  trainable, frozen = opt.split(params)          # frozen leaves are absent from `trainable`
  opt_state = opt.tx.init(trainable)             # so they get no optimizer state ...
  grads = jax.grad(loss)(trainable, frozen, ...) # ... and no gradient (loss calls merge())
  updates, opt_state = opt.tx.update(grads, opt_state, trainable)
  params = merge(optax.apply_updates(trainable, updates), frozen)
  module = Network(spec, frozen_bn=opt.frozen_bn)

The chain, in order (each piece only when enabled)::

  optax.clip_by_global_norm(clip)     on the raw gradient of the trainable leaves
  direction                           sgd: momentum trace | adamw: adam | lamb: adam | lion: sign
  add_decayed_weights(wd, wd mask)    decoupled weight decay (SGDW / AdamW): after the direction
  l2sp(anchor, alpha, beta, …)        decoupled L2-SP: after the direction too
  scale_by_trust_ratio()              lamb only (as in optax.lamb: after the decay)
  scale_by_learning_rate(schedule)    -lr(step)
  scale_by_multipliers(mult)          per-leaf lr multipliers (rules × layer-wise decay)

so for plain SGD one step is ``w -= lr(t) * mult * (g + wd*w + alpha*(w - w0))``: decay and L2-SP
follow the schedule and the multipliers, exactly like the gradient. An adaptive ``wd`` or ``alpha``
(``build_optimizer(dynamic=...)``, see ``docs/regularization.md``) is read at every update from the
extra argument ``reg`` of ``tx.update(grads, state, params, reg={"optim.weight_decay": wd, …})``. With ``accumulate_steps = k`` the
whole chain is wrapped in ``optax.MultiSteps``: ``update`` is called once per micro-batch, returns zero
updates k-1 times and, on every k-th call, applies the chain to the *mean* of the k micro-batch
gradients; the schedule (and ``total_steps``) counts these optimizer steps, not micro-batches.

A model with LoRA updates and no ``lr_rules`` trains only the LoRA factors and the heads
(:data:`LORA_RULES`). Rules are ordered ``(regex, value)`` pairs matched against whole ``/``-joined
parameter paths with
``jaxft.paths.assign`` (first match wins); every rule set is logged as a table at build time and
returned as data in ``Optimizer.table``. A rule in use that matches no parameter (a typo) is an error
unless ``allow_unmatched_rules``. Nothing here mutates its inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxft import config as config_lib
from jaxft import paths
from jaxft.models.spec import ModelSpec

Tree = Mapping[str, Any]
Schedule = Callable[[Any], jax.Array]

FROZEN = "frozen"
OPTIMIZERS = ("sgd", "adamw", "lamb", "lion")
SCHEDULES = ("constant", "warmup_cosine", "step", "linear")
KERNELS_ONLY = config_lib.KERNELS_ONLY
# The lr rules of a model with LoRA updates (ModelSpec.lora) when optim.lr_rules is empty: only the
# LoRA factors (``<conv>_lora/{down,up}``) and the heads train; explicit lr_rules replace them.
LORA_RULES = ((r".*_lora/.*", 1.0), (r"head(_[^/]+)?/.*", 1.0), (".*", FROZEN))


# ---------------------------------------------------------------------------------------------------
# Config


def default_config() -> ml_collections.ConfigDict:
  """Returns a new default ``config.optim`` section: the ``optim`` section of
  :func:`jaxft.config.default_config` (locked: unknown keys are errors), where each field is described."""
  return config_lib.default_config().optim


def seed_recipe() -> ml_collections.ConfigDict:
  """The seed project's recipe: SGD lr 1e-3, momentum 0.9, weight decay 5e-4, clip 1.0, constant lr."""
  c = default_config()
  c.name = "sgd"
  c.lr = 1e-3
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.clip_norm = 1.0
  return c


# ---------------------------------------------------------------------------------------------------
# Schedules


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
  """Returns ``step -> lr`` for ``cfg`` (a ``config.optim`` section, read only), built from optax's.

  All kinds share a linear warmup ``lr * step / warmup_steps`` for ``step < warmup_steps``; after it,
  with ``t = (step - warmup) / (total_steps - warmup)`` clipped to [0, 1] and ``end = lr * end_factor``:
  ``constant``: ``lr``; ``warmup_cosine``: ``end + (lr - end) * (1 + cos(pi t)) / 2``; ``linear``:
  ``lr + (end - lr) * t``; ``step``: ``lr * factor ** (number of boundaries <= step)`` (boundaries are
  absolute steps, warmup included).

  Raises:
    ValueError: for an unknown kind or a warmup not shorter than ``total_steps`` (decaying kinds).
  """
  s = cfg.schedule
  lr, kind, warmup = float(cfg.lr), s.kind, int(s.warmup_steps)
  end = lr * float(s.end_factor)
  if kind not in SCHEDULES:
    raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
  if kind in ("warmup_cosine", "linear") and warmup >= total_steps:
    raise ValueError(f"schedule {kind!r} needs warmup_steps ({warmup}) < total_steps ({total_steps})")
  if kind == "warmup_cosine" and lr:  # (optax's cosine divides by the peak value)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=end)
  if kind == "linear":
    main = optax.linear_schedule(lr, end, total_steps - warmup)
  elif kind == "step":
    # optax counts the steps after the warmup; a boundary listed k times multiplies k times.
    scales: dict[int, float] = {}
    for b in s.boundaries:
      scales[int(b) - warmup] = scales.get(int(b) - warmup, 1.0) * float(s.factor)
    main = optax.piecewise_constant_schedule(lr, scales)
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


# ---------------------------------------------------------------------------------------------------
# Trainable / frozen split


def partition(params: Tree, trainable_mask: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits ``params`` into ``(trainable, frozen)`` nested dicts.

  Each holds only its own leaves (a leaf is in exactly one); a module whose leaves are all frozen is
  simply absent from ``trainable``. Leaves are shared, not copied; ``params`` is never mutated.

  Args:
    params: nested dict of arrays.
    trainable_mask: same structure, bool leaves (True = trainable).

  Raises:
    ValueError: when the two trees have different paths.
  """
  flat, mask = paths.flatten(params), paths.flatten(trainable_mask)
  if set(flat) != set(mask):
    diff = sorted(set(flat) ^ set(mask))
    raise ValueError(f"trainable_mask does not match params: paths in only one of them: {diff[:8]}")
  trainable = {p: v for p, v in flat.items() if mask[p]}
  frozen = {p: v for p, v in flat.items() if not mask[p]}
  return paths.unflatten(trainable), paths.unflatten(frozen)


def merge(trainable: Tree, frozen: Tree) -> dict[str, Any]:
  """Inverse of :func:`partition`: a new nested dict with the leaves of both (inputs never mutated).

  Raises:
    ValueError: when a path is in both.
  """
  a, b = paths.flatten(trainable), paths.flatten(frozen)
  both = sorted(set(a) & set(b))
  if both:
    raise ValueError(f"paths both trainable and frozen: {both[:8]}")
  return paths.unflatten({**a, **b})


def _module_of(path: str) -> str:
  """The top-level unit of a parameter path: ``stem``, a stage name, ``neck`` or a head."""
  top = path.split("/", 1)[0]
  return "neck" if top.startswith("neck_") else top


def _is_bn_param(path: str) -> bool:
  # BatchNorm modules are named bn, bn1…, downsample_bn, neck_bn (see jaxft.models.network).
  parts = path.split("/")
  return len(parts) >= 2 and (parts[-2] == "bn" or parts[-2].endswith("_bn")
                              or (parts[-2].startswith("bn") and parts[-2][2:].isdigit()))


def _network_order(spec: ModelSpec) -> Callable[[str], tuple[int, int, str]]:
  """A sort key putting module paths in the order the network runs them (stem, stages, blocks, neck)."""
  tops = {"stem": 0, **{st.name: i + 1 for i, st in enumerate(spec.stages)}}
  blocks = {f"{st.name}/{b.name}": j for st in spec.stages for j, b in enumerate(st.blocks)}

  def key(path: str) -> tuple[int, int, str]:
    parts = path.split("/")
    return tops.get(parts[0], len(tops)), blocks.get("/".join(parts[:2]), -1), path

  return key


def frozen_bn_modules(spec: ModelSpec, frozen_mask: Tree) -> tuple[str, ...]:
  """The BatchNorms whose scale and bias are all frozen, named as compactly as possible.

  Pass the result as ``Network(frozen_bn=...)`` so those BNs use, and never update, their running
  statistics. Every granularity counts: a frozen block (``layer1/block0/.*``) freezes that block's BNs
  only. Each frozen BN is named by the highest module all of whose BNs are frozen — ``stem``, a stage
  name, a block (``layer1/block0``), else the BN itself (``layer1/block0/bn1``, ``neck_bn``). Only BN
  scale/bias decide (not the module's convs), so a frozen stage with trainable adapters grafted in still
  has frozen statistics; a BN whose affine parameters train (BitFit-style) keeps updating its statistics.

  Args:
    spec: the structure (the order of the modules).
    frozen_mask: params-shaped tree of bools (True = frozen). Never mutated.

  Returns:
    Module paths in network order (see :func:`jaxft.models.network.bn_is_frozen`).
  """
  flags: dict[str, list[bool]] = {}  # BN module path -> frozen flag of each of its parameters
  for path, frozen in paths.flatten(frozen_mask).items():
    if _is_bn_param(path):
      flags.setdefault(path.rsplit("/", 1)[0], []).append(bool(frozen))
  frozen_bns = sorted((m for m, f in flags.items() if all(f)), key=_network_order(spec))
  under = lambda prefix: [m for m in flags if m == prefix or m.startswith(prefix + "/")]
  out: list[str] = []
  for bn in frozen_bns:
    parts = bn.split("/")
    # the shortest prefix of this BN's path all of whose BNs are frozen (the BN itself at the latest)
    name = next(q for q in ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
                if all(all(flags[m]) for m in under(q)))
    if name not in out:
      out.append(name)
  return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Layer-wise lr decay


def llrd_depths(spec: ModelSpec) -> dict[str, int]:
  """Distance from the head of every parameter unit of ``spec``.

  The units, deepest first: ``stem``; each block of each stage in order (``layer1/block0`` …); the
  ``neck`` (if any); then every head at distance 0. The last unit before the heads is at distance 1.
  Derived from the structure alone, so it follows surgery (an appended block pushes all earlier units
  one step further from the head).

  Returns:
    ``{unit: distance}`` with units named like path prefixes (``stem``, ``layer2/block1``, ``neck``,
    ``head``, ``head_<name>``).
  """
  from jaxft.models.network import head_module_name  # local: keep optim importable without flax models

  units = ["stem"] + [f"{st.name}/{b.name}" for st in spec.stages for b in st.blocks]
  if spec.neck_width:
    units.append("neck")
  depths = {u: len(units) - i for i, u in enumerate(units)}
  depths.update({head_module_name(h.name): 0 for h in spec.heads})
  return depths


def llrd_multipliers(spec: ModelSpec, params: Tree, decay: float) -> dict[str, Any]:
  """Returns a params-shaped tree of Python floats ``decay ** distance`` (see :func:`llrd_depths`).

  Args:
    spec: the structure.
    params: nested dict (only its paths are read; never mutated).
    decay: the per-unit factor, e.g. 0.75; 1.0 gives all ones.

  Raises:
    ValueError: for a parameter that belongs to no unit of ``spec``.
  """
  depths = llrd_depths(spec)

  def mult(path: str, _: Any) -> float:
    parts = path.split("/")
    top = _module_of(path)
    unit = f"{parts[0]}/{parts[1]}" if len(parts) > 2 and f"{parts[0]}/{parts[1]}" in depths else top
    if unit not in depths:
      raise ValueError(f"parameter {path!r} belongs to no unit of the spec; units: {list(depths)}")
    return float(decay) ** depths[unit]

  return paths.map_leaves(mult, params)


# ---------------------------------------------------------------------------------------------------
# Rules → trees, with a table


def rule_table(tree: Tree, rules: Sequence[tuple[str, Any]], default: Any = None) -> list[dict[str, Any]]:
  """Returns one row per rule (``rule``, ``value``, ``leaves``, ``params``) plus a ``(no rule)`` row
  for unmatched leaves (when there are any), counting what each rule took (first match wins)."""
  rows = [{"rule": p, "value": v, "leaves": 0, "params": 0} for p, v in rules]
  rest = {"rule": "(no rule)", "value": default, "leaves": 0, "params": 0}
  for path, leaf in paths.flatten(tree).items():
    m = paths.match_rules(path, rules)
    row = rest if m is None else rows[m[0]]
    row["leaves"] += 1
    row["params"] += int(np.size(leaf))
  return rows + ([rest] if rest["leaves"] else [])


def _rules(value: Any, what: str) -> tuple[tuple[str, Any], ...]:
  """Validates a rule list from a config (tuples or lists of pairs)."""
  out = []
  for r in value or ():
    if not isinstance(r, (tuple, list)) or len(r) != 2 or not isinstance(r[0], str):
      raise ValueError(f"{what}: each rule must be a (regex, value) pair, got {r!r}")
    paths.compile_pattern(r[0])
    out.append((r[0], r[1]))
  return tuple(out)


def unmatched_rules(tree: Tree, rules: Sequence[tuple[str, Any]], what: str) -> list[str]:
  """Returns one line per rule of ``rules`` whose regex full-matches no path of ``tree``, naming the
  rule set ``what``, the rule and the nearest paths (empty when every rule matches something)."""
  names = list(paths.flatten(tree))
  # Offered: leaf paths and the modules above them (a rule 'layr1/.*' is nearest to 'layer1').
  offered = sorted({"/".join(p.split("/")[:i]) for p in names for i in range(1, p.count("/") + 2)})
  out = []
  for pattern, _ in rules:
    rx = paths.compile_pattern(pattern)
    if not any(rx.fullmatch(p) for p in names):
      out.append(f"{what} rule {pattern!r} matches no parameter (nearest: "
                 f"{', '.join(paths.nearest(pattern, offered, 3))})")
  return out


def _check_rules_match(cfg: ml_collections.ConfigDict, params: Tree) -> None:
  """Raises ``ValueError`` when a rule in use (lr, weight decay, L2-SP) matches no parameter of
  ``params`` — a typo would otherwise be silently ignored — unless ``cfg.allow_unmatched_rules``.
  Rules count as matching when they match frozen leaves too."""
  if cfg.allow_unmatched_rules:
    return
  sets = [("lr_rules", cfg.lr_rules)]
  if cfg.weight_decay:
    sets.append(("wd_rules", cfg.wd_rules))
  if cfg.l2sp.alpha or cfg.l2sp.beta:
    sets += [("l2sp.rules", cfg.l2sp.rules), ("l2sp.new_rules", cfg.l2sp.new_rules)]
  bad = [line for what, rules in sets for line in unmatched_rules(params, _rules(rules, what), what)]
  if bad:
    raise ValueError(f"{'; '.join(bad)}. Fix the regex (rules full-match '/'-joined parameter paths), "
                     "or set optim.allow_unmatched_rules=True")


def lr_multiplier_tree(params: Tree, rules: Sequence[tuple[str, Any]], default: float | None = 1.0,
                       log_name: str | None = "lr multipliers") -> dict[str, Any]:
  """Maps every leaf to a float multiplier or ``"frozen"`` by ordered rules (first match wins).

  Args:
    params: nested dict (only paths and sizes are read; never mutated).
    rules: ``(regex, float | "frozen")`` pairs.
    default: value of unmatched leaves; ``None`` makes every leaf required to match a rule.
    log_name: title of the logged rule table (None: no log).

  Raises:
    ValueError: for a bad regex or a value that is neither a number nor ``"frozen"``.
    jaxft.paths.PathError: for unmatched leaves when ``default`` is None.
  """
  rules = _rules(rules, "lr_rules")
  for p, v in rules:
    if not (v == FROZEN or (isinstance(v, (int, float)) and not isinstance(v, bool))):
      raise ValueError(f"lr_rules: value of {p!r} must be a number or 'frozen', got {v!r}")
  full = rules + (((".*", default),) if default is not None else ())
  return paths.assign(params, full, strict=True, log_name=log_name)


# ---------------------------------------------------------------------------------------------------
# Custom transformations


class ScaleByMultipliersState(NamedTuple):
  """No state: the multipliers are static."""


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf factor (per-subtree / layer-wise lr).

  Args:
    multipliers: a tree with the structure of the updates whose leaves are Python floats.

  Returns:
    A stateless ``GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(0.1), scale_by_multipliers({'a': 10.0, 'b': 1.0}))
    >>> p = {'a': jnp.array(1.0), 'b': jnp.array(1.0)}
    >>> u, _ = tx.update({'a': jnp.array(1.0), 'b': jnp.array(1.0)}, tx.init(p))
    >>> [round(float(u[k]), 4) for k in 'ab']
    [-1.0, -0.1]
  """

  def init_fn(params: Any) -> ScaleByMultipliersState:
    del params
    return ScaleByMultipliersState()

  def update_fn(updates: Any, state: ScaleByMultipliersState, params: Any = None) -> tuple[Any, Any]:
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(init_fn, update_fn)


class L2SPState(NamedTuple):
  """The anchor: pretrained values where L2-SP pulls toward them, a 0-d zero elsewhere."""

  anchor: Any


def l2sp(anchor: Any, alpha: float, beta: float, pretrained_mask: Any,
         mask: Any = None, alpha_from: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Decoupled L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning").

  Adds ``alpha * (w - w0)`` to the update of pretrained leaves (``w0`` = anchor) and ``beta * w`` to new
  leaves, *after* the optimizer's direction, like decoupled weight decay. Place it before
  ``scale_by_learning_rate`` (as :func:`build_optimizer` does) so the pull follows the lr schedule and
  the per-leaf multipliers: ``w -= lr * mult * (dir + alpha * (w - w0))``.

  Args:
    anchor: tree like the params; only pretrained, ``mask``-selected leaves are read (copied into the
      state, so later changes to the caller's arrays do not matter). Never mutated.
    alpha: strength of the pull toward the anchor.
    beta: decay strength of new leaves.
    pretrained_mask: tree of bools like the params, True = pretrained.
    mask: tree of bools like the params: leaves with False get no term at all (None: every leaf).
    alpha_from: when given, the strength of the pull is read at every update from the extra argument
      ``reg`` (``update(..., reg={alpha_from: scalar})``, an adaptive weight); ``alpha`` (> 0) then
      only says that pretrained leaves are pulled (their anchors are kept).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> w0 = {'old': jnp.array(1.0), 'new': jnp.array(2.0)}
    >>> tx = optax.chain(l2sp(w0, 0.5, 0.1, {'old': True, 'new': False}), optax.sgd(1.0))
    >>> w = {'old': jnp.array(3.0), 'new': jnp.array(2.0)}
    >>> u, _ = tx.update({'old': jnp.array(0.0), 'new': jnp.array(0.0)}, tx.init(w), w)
    >>> [round(float(u[k]), 4) for k in ('old', 'new')]   # -(0.5*(3-1)), -(0.1*2)
    [-1.0, -0.2]
  """
  if mask is None:
    mask = jax.tree.map(lambda _: True, pretrained_mask)
  coef = jax.tree.map(lambda pre, on: (float(alpha) if pre else float(beta)) if on else 0.0,
                      pretrained_mask, mask)
  pulls = jax.tree.map(lambda pre, on: bool(pre and on and alpha), pretrained_mask, mask)

  def init_fn(params: Any) -> L2SPState:
    del params
    return L2SPState(anchor=jax.tree.map(
        lambda a, pull: jnp.array(a, jnp.float32) if pull else jnp.zeros((), jnp.float32),
        anchor, pulls))

  def update_fn(updates: Any, state: L2SPState, params: Any = None, *, reg: Any = None,
                **extra: Any) -> tuple[Any, L2SPState]:
    del extra
    if params is None:
      raise ValueError("l2sp needs params: call update(grads, state, params)")
    a = float(alpha) if alpha_from is None else dynamic_value(reg, alpha_from)
    out = jax.tree.map(lambda u, w, anc, c, pull: u + ((a if pull else c) * (w - anc)).astype(u.dtype)
                       if (pull or c) else u, updates, params, state.anchor, coef, pulls)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dynamic_value(reg: Any, name: str) -> jax.Array:
  """``reg[name]``: a hyperparameter the train step passes to every update (an adaptive weight).

  Raises:
    ValueError: ``reg`` lacks it (the caller did not pass ``update(..., reg=...)``).
  """
  if reg is None or name not in reg:
    raise ValueError(f"this optimizer reads {name!r} at every update: call "
                     f"tx.update(grads, state, params, reg={{{name!r}: value}})")
  return jnp.asarray(reg[name], jnp.float32)


def add_decayed_weights_from(name: str, mask: Any) -> optax.GradientTransformationExtraArgs:
  """Decoupled weight decay ``u + wd * w`` on the leaves ``mask`` selects, as
  ``optax.add_decayed_weights``, but with ``wd = reg[name]`` read at every update (the extra argument
  ``reg``, see :func:`dynamic_value`): an adaptive weight decay moves with no recompilation.

  Args:
    name: the key of the decay in ``reg``.
    mask: params-shaped tree of bools (True = decayed). Never mutated.

  Returns:
    A stateless ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``.
  """

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: Any, state: optax.EmptyState, params: Any = None, *, reg: Any = None,
                **extra: Any) -> tuple[Any, optax.EmptyState]:
    del extra
    if params is None:
      raise ValueError("weight decay needs params: call update(grads, state, params, reg=...)")
    wd = dynamic_value(reg, name)
    return jax.tree.map(lambda u, w, m: u + (wd * w).astype(u.dtype) if m else u,
                        updates, params, mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------
# The builder


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """What the train step needs.

  Attributes:
    tx: the optax transformation over the *trainable* subtree only (``tx.init(trainable)``,
      ``tx.update(grads, state, trainable)`` — params are required).
    trainable_mask: params-shaped tree of bools (True = trainable).
    frozen_bn: BN module paths for ``Network(frozen_bn=...)`` (see :func:`frozen_bn_modules`; empty
      when ``freeze_bn_stats`` is off).
    schedule: ``step -> lr`` (the peak-lr schedule, before multipliers), for logging.
    multipliers: trainable-shaped tree of the final per-leaf lr multipliers (rules × LLRD).
    table: rule tables as data: ``{'lr': rows, 'weight_decay': rows, 'l2sp': rows}`` (see
      :func:`rule_table`), the same numbers that were logged.
  """

  tx: optax.GradientTransformation
  trainable_mask: dict[str, Any]
  frozen_bn: tuple[str, ...]
  schedule: Schedule
  multipliers: dict[str, Any]
  table: dict[str, list[dict[str, Any]]]

  def split(self, params: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
    """``partition(params, self.trainable_mask)``."""
    return partition(params, self.trainable_mask)


def _direction(cfg: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
  if cfg.name == "sgd":
    return [optax.trace(decay=float(cfg.momentum), nesterov=bool(cfg.nesterov))] if cfg.momentum else []
  if cfg.name in ("adamw", "lamb"):
    return [optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps))]
  if cfg.name == "lion":
    return [optax.scale_by_lion(b1=float(cfg.b1), b2=float(cfg.b2))]
  raise ValueError(f"unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")


def _bool_tree(tree: Tree, rules: Any, what: str, log_name: str) -> dict[str, Any]:
  rules = _rules(rules, what)
  for p, v in rules:
    if not isinstance(v, bool):
      raise ValueError(f"{what}: value of {p!r} must be True or False, got {v!r}")
  return paths.assign(tree, rules, strict=False, default=False, log_name=log_name)


def build_optimizer(cfg: ml_collections.ConfigDict, params: Tree, *, spec: ModelSpec | None = None,
                    total_steps: int, anchor: Tree | None = None,
                    new_leaf_mask: Tree | None = None,
                    clip: Callable[[float], optax.GradientTransformation] = optax.clip_by_global_norm,
                    dynamic: Sequence[str] = ()) -> Optimizer:
  """Builds the optax chain described in the module docstring from a ``config.optim`` section.

  Args:
    cfg: see :func:`default_config`. Read only.
    params: the model's params (paths, shapes; and the default L2-SP anchor). Never mutated.
    spec: the structure; needed for ``llrd != 1`` and for ``frozen_bn``.
    total_steps: optimizer steps of the run (micro-batches / ``accumulate_steps``).
    anchor: L2-SP anchor (the pretrained params); default ``params`` itself.
    new_leaf_mask: params-shaped bools, True = created by surgery (not pretrained), e.g.
      ``jaxft.train.new_leaf_mask(base, model)``; default none. Leaves ``cfg.l2sp.new_rules`` marks
      and leaves absent from ``anchor`` count as new too.
    clip: ``clip(max_norm)`` → the clipping transformation (``jaxft.cpu.norm_functions()`` supplies the
      CPU backend's, with the same updates).
    dynamic: of ``"weight_decay"`` and ``"l2sp.alpha"``, those read at every update from the extra
      argument ``reg`` (``tx.update(g, s, p, reg={"optim.weight_decay": wd, …})``, adaptive weights);
      their ``cfg`` values must then be > 0 (they turn the term on).

  Returns:
    An :class:`Optimizer`.

  Raises:
    ValueError: bad optimizer / schedule name, bad regex or rule value, a rule in use that matches no
      parameter (unless ``cfg.allow_unmatched_rules``), nothing trainable, ``llrd`` without ``spec``, a
      pretrained leaf whose anchor shape differs.
    jaxft.paths.PathError: leaves matching no lr rule while ``lr_default`` is None.
  """
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
  _check_rules_match(cfg, params)
  schedule = make_schedule(cfg, total_steps)
  table: dict[str, list[dict[str, Any]]] = {}

  # Which leaves train, and at which multiplier.
  lr_rules = _rules(default_lr_rules(cfg, spec), "lr_rules")
  rule_mult = lr_multiplier_tree(params, lr_rules, cfg.lr_default)
  table["lr"] = rule_table(params, lr_rules + (((".*", cfg.lr_default),) if cfg.lr_default is not None
                                                 else ()))
  trainable_mask = jax.tree.map(lambda m: m != FROZEN, rule_mult)
  if not any(jax.tree.leaves(trainable_mask)):
    raise ValueError("every parameter is frozen by lr_rules: nothing to train")
  if float(cfg.llrd) != 1.0:
    if spec is None:
      raise ValueError("llrd needs the ModelSpec: build_optimizer(..., spec=model.spec)")
    depth_mult = llrd_multipliers(spec, params, float(cfg.llrd))
  else:
    depth_mult = jax.tree.map(lambda _: 1.0, rule_mult)
  mult_all = jax.tree.map(lambda r, d: r if r == FROZEN else float(r) * d, rule_mult, depth_mult)
  trainable, _ = partition(params, trainable_mask)
  multipliers, _ = partition(mult_all, trainable_mask)
  frozen_mask = jax.tree.map(lambda t: not t, trainable_mask)
  frozen_bn = frozen_bn_modules(spec, frozen_mask) if (spec is not None and cfg.freeze_bn_stats) else ()
  if frozen_bn:
    logging.info("BatchNorm statistics frozen in: %s", ", ".join(frozen_bn))

  tx = _chain(cfg, params, trainable, trainable_mask, multipliers, schedule, table,
              dict(anchor=anchor, new_leaf_mask=new_leaf_mask, clip=clip, dynamic=dynamic))
  return Optimizer(tx=tx, trainable_mask=trainable_mask, frozen_bn=frozen_bn, schedule=schedule,
                   multipliers=multipliers, table=table)


def _chain(cfg: ml_collections.ConfigDict, params: Tree, trainable: Tree, trainable_mask: Tree,
           multipliers: Tree, schedule: Schedule, table: dict[str, list[dict[str, Any]]],
           opts: dict[str, Any]) -> optax.GradientTransformation:
  """The chain of the module docstring over the trainable subtree (``opts``: build_optimizer's
  ``anchor``, ``new_leaf_mask``, ``clip`` and ``dynamic``); fills ``table``'s decay and L2-SP rows."""
  clip, dynamic = opts["clip"], opts["dynamic"]
  chain: list[optax.GradientTransformation] = []
  if cfg.clip_norm:
    chain.append(clip(float(cfg.clip_norm)))
  chain += _direction(cfg)
  if cfg.weight_decay:
    wd_mask = _bool_tree(trainable, cfg.wd_rules, "wd_rules", "weight decay mask")
    table["weight_decay"] = rule_table(trainable, _rules(cfg.wd_rules, "wd_rules"), False)
    chain.append(add_decayed_weights_from("optim.weight_decay", wd_mask) if "weight_decay" in dynamic
                 else optax.add_decayed_weights(float(cfg.weight_decay), mask=wd_mask))
  if cfg.l2sp.alpha or cfg.l2sp.beta:
    chain.append(_build_l2sp(cfg, params, trainable, trainable_mask, opts["anchor"],
                             opts["new_leaf_mask"], table,
                             "optim.l2sp.alpha" if "l2sp.alpha" in dynamic else None))
  if cfg.name == "lamb":
    chain.append(optax.scale_by_trust_ratio())
  chain.append(optax.scale_by_learning_rate(schedule))
  if any(m != 1.0 for m in jax.tree.leaves(multipliers)):
    chain.append(scale_by_multipliers(multipliers))
  tx = optax.chain(*chain)
  if int(cfg.accumulate_steps) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.accumulate_steps)).gradient_transformation()
  return tx


def default_lr_rules(cfg: ml_collections.ConfigDict, spec: ModelSpec | None) -> Any:
  """``cfg.lr_rules``, or :data:`LORA_RULES` when they are empty and ``spec`` has LoRA updates."""
  if cfg.lr_rules or spec is None or not spec.lora:
    return cfg.lr_rules
  logging.info("LoRA model and no optim.lr_rules: training only the LoRA factors and the heads")
  return LORA_RULES


def _build_l2sp(cfg: ml_collections.ConfigDict, params: Tree, trainable: Tree, trainable_mask: Tree,
                anchor: Tree | None, new_leaf_mask: Tree | None,
                table: dict[str, list[dict[str, Any]]],
                alpha_from: str | None = None) -> optax.GradientTransformation:
  flat_anchor = paths.flatten(params if anchor is None else anchor)
  by_rule = paths.flatten(_bool_tree(params, cfg.l2sp.new_rules, "l2sp.new_rules", "L2-SP new leaves"))
  given = paths.flatten(new_leaf_mask) if new_leaf_mask is not None else {}
  new_flat = {p: bool(given.get(p, False)) or bool(v) for p, v in by_rule.items()}
  on = _bool_tree(trainable, cfg.l2sp.rules, "l2sp.rules", "L2-SP leaves")
  pre, anc = {}, {}
  for path, w in paths.flatten(trainable).items():
    is_pre = not new_flat.get(path, False) and path in flat_anchor
    if is_pre and np.shape(flat_anchor[path]) != np.shape(w):
      raise ValueError(f"L2-SP anchor of {path!r} has shape {np.shape(flat_anchor[path])}, the "
                       f"parameter {np.shape(w)}; mark it new (new_leaf_mask / l2sp.new_rules)")
    pre[path] = is_pre
    anc[path] = flat_anchor[path] if is_pre else np.zeros((), np.float32)
  pre_tree, anc_tree = paths.unflatten(pre), paths.unflatten(anc)
  rows = {"pretrained (alpha)": [0, 0], "new (beta)": [0, 0], "off": [0, 0]}
  on_flat = paths.flatten(on)
  for path, w in paths.flatten(trainable).items():
    key = "off" if not on_flat[path] else ("pretrained (alpha)" if pre[path] else "new (beta)")
    rows[key][0] += 1
    rows[key][1] += int(np.size(w))
  table["l2sp"] = [{"rule": k, "value": v, "leaves": n, "params": s} for (k, (n, s)), v in
                   zip(rows.items(), (cfg.l2sp.alpha, cfg.l2sp.beta, 0.0))]
  logging.info("L2-SP: %s", "; ".join(f"{r['rule']}: {r['leaves']} leaves, {r['params']:,} params"
                                      for r in table["l2sp"]))
  return l2sp(anc_tree, float(cfg.l2sp.alpha), float(cfg.l2sp.beta), pre_tree, on, alpha_from)
