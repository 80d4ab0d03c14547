"""Building a surgery op's result: the new spec's variables, sharing every leaf that did not change.

Every op ends in :func:`rebuild`. New parameters come from ``Network(new_spec)``'s own init (seeded by an
integer), so surgery never duplicates model code; every other leaf is the very same array object as
before. The op's :func:`op_record` is appended to the evolution log (``Model.history``); checkpoints store
these records, so their format is fixed: ``{"op": name, "args": {...}}`` plus ``"reinitialised"`` when
:func:`rebuild` had to re-initialise modules.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from jaxft import paths
from jaxft.models import abstract_variables
from jaxft.models.model import Model, init_flat
from jaxft.models.spec import ModelSpec

logger = logging.getLogger(__name__)

Record = dict[str, Any]

# Parameter shapes do not depend on the spatial size; a small input keeps the init cheap.
_INIT_SIZE = 32


def op_record(op: str, **args: Any) -> Record:
  """Returns the evolution-log record of op ``op`` called with ``args`` (JSON-serialisable values)."""
  return {"op": op, "args": args}


def _init_leaves(spec: ModelSpec, seed: int, wanted: Sequence[str]) -> dict[str, jax.Array]:
  """Initial values of the leaves ``wanted`` of ``Network(spec)`` under ``seed`` (only those are computed:
  initialising a whole ResNet-50 to keep a 10-class head would cost seconds)."""
  return init_flat(spec, jax.random.key(seed), list(wanted), input_size=_INIT_SIZE)


def _module_of(leaf_path: str) -> str:
  """``params/layer1/block0/conv1/kernel`` → ``layer1/block0/conv1``."""
  return leaf_path.split("/", 1)[1].rsplit("/", 1)[0]


def _under(module: str, prefixes: Iterable[str]) -> bool:
  return any(module == p or module.startswith(p + "/") for p in prefixes)


def rebuild(model: Model, spec: ModelSpec, record: Record, *, seed: int = 0,
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
  new = paths.flatten(abstract_variables(spec))
  # The network skips a LoRA spec whose conv is gone; that would silently drop the update.
  lost = [x.module for x in spec.lora if f"params/{x.module}_lora/down/kernel" not in new]
  if lost:
    raise ValueError(f"{record['op']} removes or renames convs that carry LoRA updates ({lost}); "
                     "merge_lora before this op")
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
