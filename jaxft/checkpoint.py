"""Model checkpoints: one orbax directory holds everything needed to rebuild and use a :class:`Model`.

A jaxft checkpoint is an orbax composite checkpoint with two items:

* ``variables`` — ``{'params': …, 'batch_stats': …}`` (``ocp.args.StandardSave``);
* ``model`` — JSON (``ocp.args.JsonSave``)::

    {"format": "jaxft.model/1", "spec": spec.to_dict(), "meta": {...}, "history": [...]}

so :func:`load_model` rebuilds the network from the stored spec with no config. Training workdirs use
the same two items inside each step of an orbax ``CheckpointManager`` at ``WORKDIR/checkpoints/``, plus
``opt_state`` and ``train`` (``{"step"}``: what resuming needs) and, when EMA is on, ``ema`` (the
averaged variables, as whole variables: :func:`load_ema_model` rebuilds a model from them). Save and
restore of a train state are :func:`save_train_state` / :func:`restore_train_state`, here only. Orbax
writes each step to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint as the latest.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxft.models import Model, ModelSpec
from jaxft.models.model import abstract_variables

if TYPE_CHECKING:
  from jaxft.train.state import TrainState

log = logging.getLogger(__name__)

FORMAT = "jaxft.model/1"
# Item names inside one checkpoint (directory names on disk: renaming one breaks old checkpoints).
VARIABLES_ITEM = "variables"
MODEL_ITEM = "model"
OPT_STATE_ITEM = "opt_state"
TRAIN_ITEM = "train"
EMA_ITEM = "ema"
TRAIN_ITEMS = (VARIABLES_ITEM, MODEL_ITEM, OPT_STATE_ITEM, TRAIN_ITEM, EMA_ITEM)
# The metric a training CheckpointManager keeps its best step by (recorded with every step that has it).
VAL_TOP1 = "val_top1"
CHECKPOINTS_SUBDIR = "checkpoints"
# Root metadata keys of a training CheckpointManager that name the metric defining the "best" step.
BEST_METRIC_KEY, BEST_MODE_KEY = "best_metric", "best_mode"


class CheckpointError(ValueError):
  """A path that is not a loadable jaxft checkpoint, or a model that cannot be saved."""


def model_record(model: Model) -> dict[str, Any]:
  """The JSON content of the ``model`` item (format tag, spec, meta, history). ``model`` is not mutated.

  Raises:
    CheckpointError: when ``meta`` or ``history`` hold something JSON cannot store.
  """
  record = {"format": FORMAT, "spec": model.spec.to_dict(), "meta": dict(model.meta),
            "history": [dict(h) for h in model.history]}
  try:
    json.dumps(record, allow_nan=True)
  except TypeError as e:
    raise CheckpointError(f"model meta/history must be JSON-serialisable: {e}") from None
  return record


def save_args(model: Model) -> dict[str, ocp.args.CheckpointArgs]:
  """The orbax args of the two jaxft items, for ``ocp.args.Composite(**save_args(model), …)``.

  Use this in a training loop so that its step directories are loadable by :func:`load_model`.
  """
  return {VARIABLES_ITEM: ocp.args.StandardSave(_plain(model.variables)),
          MODEL_ITEM: ocp.args.JsonSave(model_record(model))}


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
  # orbax wants dicts, not FrozenDicts/Mappings; copy the structure only (leaves are shared).
  return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def save_model(directory: str | os.PathLike, model: Model, *, force: bool = False) -> Path:
  """Writes ``model`` as an orbax checkpoint directory.

  Orbax writes into a temporary sibling directory and renames it when complete, so ``directory`` is
  never left half-written.

  Args:
    directory: the checkpoint directory to create.
    model: what to save; never mutated.
    force: replace an existing ``directory``.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    CheckpointError: if ``directory`` exists and ``force`` is False, or meta is not JSON-serialisable.
  """
  path = Path(directory).absolute()
  if path.exists() and not force:
    raise CheckpointError(f"{path} already exists; pass --force to overwrite (force=True)")
  args = ocp.args.Composite(**save_args(model))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=args, force=force)
  return path


# ---------------------------------------------------------------------------------------------------------
# Loading.


def is_model_checkpoint(path: str | os.PathLike) -> bool:
  """True if ``path`` is a directory holding the ``model`` and ``variables`` items."""
  p = Path(path)
  return (p / MODEL_ITEM).is_dir() and (p / VARIABLES_ITEM).is_dir()


def _step_dirs(manager_dir: Path) -> dict[int, Path]:
  # CheckpointManager names finished steps by their number (optionally with a prefix such as "step_");
  # unfinished ones carry an orbax tmp suffix and are never model checkpoints yet.
  out = {}
  for d in manager_dir.iterdir():
    digits = d.name.rsplit("_", 1)[-1]
    if d.is_dir() and digits.isdigit() and is_model_checkpoint(d):
      out[int(digits)] = d
  return out


def _read_metrics(step_dir: Path) -> dict[str, Any] | None:
  # CheckpointManager stores the metrics passed to save() as JSON in the step's "metrics" item.
  for f in (step_dir / "metrics" / "metrics", step_dir / "metrics"):
    if f.is_file():
      try:
        return json.loads(f.read_text())
      except (OSError, ValueError):
        return None
  return None


def _root_metadata(manager_dir: Path) -> dict[str, Any]:
  try:
    with ocp.CheckpointManager(
        manager_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False)) as mgr:
      return dict(mgr.metadata().custom_metadata or {})
  except Exception:  # noqa: BLE001 — a manager without root metadata is fine
    return {}


def _infer_mode(metric: str) -> str:
  return "min" if any(s in metric.lower() for s in ("loss", "error", "err")) else "max"


def best_step(manager_dir: str | os.PathLike, metric: str | None = None,
              mode: str | None = None) -> tuple[int, str]:
  """Picks the step to load from a ``CheckpointManager`` directory.

  The best step by ``metric`` if the steps recorded metrics (``manager.save(step, args, metrics=…)``),
  else the latest. The metric is ``metric``, else the manager's root metadata ``best_metric`` (with
  ``best_mode``), else the only metric recorded. ``mode`` defaults to ``min`` for names containing
  ``loss``/``err`` and ``max`` otherwise.

  Returns:
    ``(step, why)`` where ``why`` says how the step was chosen.

  Raises:
    CheckpointError: when the directory holds no finished step.
  """
  d = Path(manager_dir)
  steps = _step_dirs(d)
  if not steps:
    raise CheckpointError(f"{d} holds no finished checkpoint steps")
  metrics = {s: m for s, p in steps.items() if isinstance(m := _read_metrics(p), Mapping)}
  if metric is None:
    root = _root_metadata(d)
    metric = root.get(BEST_METRIC_KEY)
    mode = mode or root.get(BEST_MODE_KEY)
  if metric is None:
    names = {k for m in metrics.values() for k, v in m.items() if isinstance(v, (int, float))}
    metric = next(iter(names)) if len(names) == 1 else None
  scored = {s: float(m[metric]) for s, m in metrics.items()
            if metric is not None and isinstance(m.get(metric), (int, float))
            and not math.isnan(float(m[metric]))}
  if not scored:
    latest = max(steps)
    return latest, f"latest step {latest} (no best-metric recorded)"
  mode = mode or _infer_mode(metric)
  if mode not in ("min", "max"):
    raise CheckpointError(f"best mode must be 'min' or 'max', got {mode!r}")
  pick = (min if mode == "min" else max)(scored, key=lambda s: (scored[s], s if mode == "max" else -s))
  return pick, f"best step {pick} by {metric}={scored[pick]:g} ({mode})"


def find_checkpoint(path: str | os.PathLike, *, metric: str | None = None,
                    mode: str | None = None) -> Path:
  """Resolves a model checkpoint, a step directory, a ``checkpoints/`` directory or a training workdir
  to the model checkpoint directory to load (see :func:`best_step`).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    CheckpointError: if ``path`` is not a jaxft checkpoint or workdir.
  """
  p = Path(path).absolute()
  if not p.exists():
    raise FileNotFoundError(f"no such checkpoint: {p}")
  if is_model_checkpoint(p):
    return p
  for mgr in (p / CHECKPOINTS_SUBDIR, p):
    if mgr.is_dir() and _step_dirs(mgr):
      step, why = best_step(mgr, metric, mode)
      log.info("loading %s from %s", why, mgr)
      return _step_dirs(mgr)[step]
  raise CheckpointError(
      f"{p} is not a jaxft checkpoint: expected the items '{MODEL_ITEM}/' and '{VARIABLES_ITEM}/' "
      f"(written by jaxft.checkpoint.save_model) or a training workdir with "
      f"'{CHECKPOINTS_SUBDIR}/<step>/'")


def _read_record(ckpt: Path) -> dict[str, Any]:
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    record = ckptr.restore(ckpt, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))[
        MODEL_ITEM]
  if not isinstance(record, Mapping) or record.get("format") != FORMAT:
    got = record.get("format") if isinstance(record, Mapping) else type(record).__name__
    raise CheckpointError(f"{ckpt} is not a jaxft checkpoint: model item has format {got!r}, "
                          f"expected {FORMAT!r}")
  return dict(record)


def _restore_model(ckpt: Path, item: str) -> Model:
  """The :class:`Model` of checkpoint directory ``ckpt``, its variables read from ``item``."""
  record = _read_record(ckpt)
  spec = ModelSpec.from_dict(record["spec"])
  target = abstract_variables(spec)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(ckpt, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{ckpt}: stored variables do not fit the stored spec: {e}") from None
  variables = jax.tree.map(np.asarray, _plain(restored[item]))
  return Model(spec=spec, variables=variables, meta=dict(record.get("meta") or {}),
               history=tuple(dict(h) for h in record.get("history") or ()))


def load_model(path: str | os.PathLike, *, metric: str | None = None, mode: str | None = None) -> Model:
  """Loads a :class:`Model` saved by :func:`save_model`, or the best/latest step of a training workdir.

  Args:
    path: a checkpoint directory, a training workdir, its ``checkpoints/`` directory or a step directory.
    metric: for workdirs, the recorded metric that defines the best step (see :func:`best_step`).
    mode: ``min`` or ``max`` for ``metric``.

  Returns:
    A new :class:`Model` whose network is rebuilt from the stored spec; variables are numpy arrays.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    CheckpointError: if ``path`` is not a jaxft checkpoint, or its variables do not fit its spec.
  """
  return _restore_model(find_checkpoint(path, metric=metric, mode=mode), VARIABLES_ITEM)


def load_ema_model(path: str | os.PathLike, *, metric: str | None = None,
                   mode: str | None = None) -> Model:
  """Loads the EMA weights of a training workdir (or one of its step directories) as a :class:`Model`.

  :func:`load_model` on the same path gives the raw weights; this gives the averaged ones with the same
  structure, metadata and history (same arguments and errors as :func:`load_model`).

  Raises:
    CheckpointError: the checkpoint has no ``ema`` item (the run had EMA off).
  """
  ckpt = find_checkpoint(path, metric=metric, mode=mode)
  _read_record(ckpt)  # not a jaxft checkpoint at all: say that first
  if not (ckpt / EMA_ITEM).is_dir():
    raise CheckpointError(f"{ckpt} has no '{EMA_ITEM}' item: the run was trained without "
                          "EMA (config.ema.decay = 0)")
  return _restore_model(ckpt, EMA_ITEM)


# The name users reach for when starting a fine-tune from a converted or trained model.
load_pretrained = load_model


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: one CheckpointManager per workdir, one step directory per saved train state.


def train_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
  """Returns the CheckpointManager of a training workdir (``workdir`` absolute): it keeps the last
  ``keep`` steps plus the best by ``val_top1``."""
  from orbax.checkpoint import checkpoint_managers as cm  # pylint: disable=g-import-not-at-top
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=max(1, keep)),
      cm.BestN(get_metric_fn=lambda m: m[VAL_TOP1], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                         enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(workdir / CHECKPOINTS_SUBDIR, options=options, item_names=TRAIN_ITEMS)


def save_train_state(mngr: ocp.CheckpointManager, state: "TrainState", model: Model,
                     val_top1: float | None = None) -> None:
  """Saves ``state`` (with ``model``'s structure, meta and history) at ``state.step``; blocks until
  written. ``val_top1`` is recorded as the step's metric. Nothing is mutated."""
  step = int(state.step)
  items = {VARIABLES_ITEM: ocp.args.StandardSave(jax.device_get(state.variables())),
           MODEL_ITEM: ocp.args.JsonSave(model_record(model)),
           OPT_STATE_ITEM: ocp.args.StandardSave(jax.device_get(state.opt_state)),
           TRAIN_ITEM: ocp.args.JsonSave({"step": step})}
  if state.ema is not None:
    # Stored as whole variables (frozen leaves included), so the item alone rebuilds a model.
    items[EMA_ITEM] = ocp.args.StandardSave(jax.device_get(state.ema_variables()))
  mngr.save(step, args=ocp.args.Composite(**items),
            metrics=None if val_top1 is None else {VAL_TOP1: val_top1}, force=True)
  mngr.wait_until_finished()


def restore_train_state(mngr: ocp.CheckpointManager, step: int, template: "TrainState") -> "TrainState":
  """Returns the train state saved at ``step``, with the structure and dtypes of ``template`` (which is
  not mutated).

  Raises:
    CheckpointError: the checkpoint does not fit ``template`` (a changed model or optimizer).
  """
  items = {VARIABLES_ITEM: ocp.args.StandardRestore(jax.device_get(template.variables())),
           OPT_STATE_ITEM: ocp.args.StandardRestore(jax.device_get(template.opt_state))}
  if template.ema is not None:
    items[EMA_ITEM] = ocp.args.StandardRestore(jax.device_get(template.ema_variables()))
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(
        f"the checkpoint at step {step} in {mngr.directory} does not fit the model/optimizer this "
        f"config builds (changed surgery or optimizer settings?): {str(e)[:500]}. Use a new --workdir, "
        "or start from that checkpoint as pretrained weights (--config.model.pretrained=WORKDIR).") from None
  ema = restored[EMA_ITEM] if template.ema is not None else None
  return template.with_variables(restored[VARIABLES_ITEM], restored[OPT_STATE_ITEM], step=step,
                                 ema_variables=ema)
