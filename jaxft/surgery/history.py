"""Replaying the evolution log: the registry of ops by name, :func:`replay` and :func:`apply_ops`.

A record is ``{"op": name, "args": {...}}`` as the ops write it (:mod:`jaxft.surgery.ops`,
:mod:`jaxft.surgery.widening`, :mod:`~jaxft.surgery.lora`, :mod:`~jaxft.surgery.fold`); a config
writes an op as ``{"op": name, **args}``. Both name ops through :data:`REGISTRY`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

from jaxft.models.model import Model
from jaxft.surgery import fold as fold_lib
from jaxft.surgery import lora as lora_lib
from jaxft.surgery import ops as ops_lib
from jaxft.surgery import widening as widening_lib

# The modules whose ``__all__`` are ops (a new op module is added here and to jaxft.surgery's exports).
OP_MODULES = (ops_lib, widening_lib, lora_lib, fold_lib)

# op name (as recorded in Model.history) → function: every op of the OP_MODULES.
REGISTRY: dict[str, Callable[..., Model]] = {name: getattr(module, name) for module in OP_MODULES
                                             for name in module.__all__}


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
