"""Model checkpoints: one orbax directory holds everything needed to rebuild and use a :class:`Model`.

A jaxft checkpoint is an orbax composite checkpoint with two items:

* ``variables`` — ``{'params': …, 'batch_stats': …}`` (``ocp.args.StandardSave``);
* ``model`` — JSON (``ocp.args.JsonSave``)::

    {"format": "jaxft.model/1", "spec": spec.to_dict(), "meta": {...}, "history": [...]}

so :func:`load_model` rebuilds the network from the stored spec with no config. Training workdirs use
the same two items inside each step of an orbax ``CheckpointManager`` at ``WORKDIR/checkpoints/``, plus
``opt_state`` and ``train`` (``{"step"}``, and ``"adaptive"`` when a weight is adaptive: what resuming
needs) and, when EMA is on, ``ema`` (the averaged variables, as whole variables: :func:`load_ema_model`
rebuilds a model from them) and, with ``loss.delta``, ``delta_attention`` (DELTA's channel weights, read
back by :func:`restore_train_item` so a resumed run never recomputes them). Save and
restore of a train state are :func:`save_train_state` / :func:`restore_train_state`, here only. Orbax
writes each step to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint as the latest.

Damage after the write (a truncated file, flipped bytes, a deleted item) is caught by checksums: once
orbax has finalised a checkpoint, ``jaxft_checksums.json`` in it records the size and sha256 of every
file (:func:`write_checksums`), and :func:`damage` compares them before anything is read. A damaged step
of a workdir is skipped with a warning naming it and the file; loading and resuming use the next intact
step. Checkpoints written without checksums (older jaxft, or a crash between orbax's rename and the
checksum file) are read unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

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
ADAPTIVE_KEY = "adaptive"  # in the train item: {config key: [value, mode]} of the adaptive weights
# DELTA's channel attention {stage: [C]}, computed once before step 1 (jaxft.train.delta).
DELTA_ITEM = "delta_attention"
TRAIN_ITEMS = (VARIABLES_ITEM, MODEL_ITEM, OPT_STATE_ITEM, TRAIN_ITEM, EMA_ITEM, DELTA_ITEM)
# The metric a training CheckpointManager keeps its best step by (recorded with every step that has it).
VAL_TOP1 = "val_top1"
CHECKPOINTS_SUBDIR = "checkpoints"
# Root metadata keys of a training CheckpointManager that name the metric defining the "best" step.
BEST_METRIC_KEY, BEST_MODE_KEY = "best_metric", "best_mode"


# The per-checkpoint checksum file (see the module docstring) and where a resuming run moves damaged
# steps newer than the one it resumes (so that the step can be written again; nothing is deleted).
CHECKSUMS_FILE = "jaxft_checksums.json"
CHECKSUMS_FORMAT = "jaxft.checksums/1"
DAMAGED_SUBDIR = "checkpoints_damaged"
# Meta keys set by load_model / load_ema_model (which step and weights were loaded); never saved.
LOAD_META_KEYS = ("checkpoint_step", "weights", "weights_item", "checkpoint_why")


class CheckpointError(ValueError):
  """A path that is not a loadable jaxft checkpoint, or a model that cannot be saved."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files changed after they were written, with no intact step to fall back to."""

  exit_code = 4  # the shared exit-code contract: damaged checkpoint that cannot be recovered


class NonFiniteStateError(CheckpointError):
  """A train state with a NaN or infinity, refused by :func:`save_train_state`.

  Attributes:
    leaf: the path of the first non-finite leaf (``variables/params/head/kernel``).
  """

  exit_code = 3  # the shared exit-code contract: non-finite loss or state

  def __init__(self, leaf: str):
    super().__init__(f"{leaf} holds a NaN or infinity")
    self.leaf = leaf


def model_record(model: Model) -> dict[str, Any]:
  """The JSON content of the ``model`` item (format tag, spec, meta, history). ``model`` is not mutated.

  Raises:
    CheckpointError: when ``meta`` or ``history`` hold something JSON cannot store.
  """
  # What load_model records about the loaded step describes that load, not the model: never stored.
  meta = {k: v for k, v in model.meta.items() if k not in LOAD_META_KEYS}
  record = {"format": FORMAT, "spec": model.spec.to_dict(), "meta": meta,
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
  # Always a batch_stats collection (empty for a model without BN, e.g. folded), as training saves it.
  return {VARIABLES_ITEM: ocp.args.StandardSave({"batch_stats": {}, **_plain(model.variables)}),
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
  write_checksums(path)
  return path


# ---------------------------------------------------------------------------------------------------------
# Checksums: what a finished checkpoint holds, so that later damage is found before it is read.


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def write_checksums(ckpt: str | os.PathLike) -> None:
  """Records the size and sha256 of every file under the finished checkpoint directory ``ckpt`` in its
  ``jaxft_checksums.json``, atomically (a crash leaves no checksum file, never a partial one)."""
  root = Path(ckpt)
  files = {p.relative_to(root).as_posix(): [p.stat().st_size, _sha256(p)]
           for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(CHECKSUMS_FILE)}
  tmp = root / (CHECKSUMS_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": CHECKSUMS_FORMAT, "files": files}, f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, root / CHECKSUMS_FILE)


def _read_checksums(ckpt: Path) -> dict[str, list] | None | str:
  # The recorded files, None when the checkpoint has no checksum file, or what is wrong with it.
  path = ckpt / CHECKSUMS_FILE
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
    files = record["files"]
    if record.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
      raise ValueError(record.get("format"))
    return files
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return f"its checksum file {CHECKSUMS_FILE} is unreadable"


def damage(ckpt: str | os.PathLike, items: Sequence[str] | None = None) -> str | None:
  """What is wrong with the files of checkpoint directory ``ckpt``, or None when they are intact.

  Args:
    ckpt: a checkpoint (or training step) directory.
    items: check only these items' directories (and the top-level files); they must exist. None: all.

  Returns:
    None, or one phrase naming the problem and the file (``variables/…/d/ab12 checksum mismatch``,
    ``… is truncated (100 of 812 bytes)``, ``item directory 'opt_state/' is missing``). A checkpoint
    written without checksums is only checked for its items' directories.
  """
  root = Path(ckpt)
  missing = [i for i in items or () if not (root / i).is_dir()]
  if missing:
    return f"item directory '{missing[0]}/' is missing"
  files = _read_checksums(root)
  if files is None or isinstance(files, str):
    return files
  for rel, (size, digest) in sorted(files.items()):
    top = rel.split("/", 1)[0]
    if items is not None and "/" in rel and top not in items:
      continue
    p = root / rel
    if not p.is_file():
      return (f"item directory '{top}/' is missing" if "/" in rel and not (root / top).is_dir()
              else f"{rel} is missing")
    got = p.stat().st_size
    if got != size:
      return (f"{rel} is truncated ({got} of {size} bytes)" if got < size
              else f"{rel} has {got} bytes, {size} were written")
    if _sha256(p) != digest:
      return f"{rel} checksum mismatch"
  return None


# ---------------------------------------------------------------------------------------------------------
# Loading.


def is_model_checkpoint(path: str | os.PathLike) -> bool:
  """True if ``path`` is a directory holding the ``model`` and ``variables`` items."""
  p = Path(path)
  return (p / MODEL_ITEM).is_dir() and (p / VARIABLES_ITEM).is_dir()


def _is_written_checkpoint(path: Path) -> bool:
  # A checkpoint, complete or damaged: its items, or the checksums jaxft wrote when it was finished.
  return is_model_checkpoint(path) or (path / CHECKSUMS_FILE).is_file() or (path / MODEL_ITEM).is_dir()


def _step_dirs(manager_dir: Path) -> dict[int, Path]:
  # CheckpointManager names finished steps by their number (optionally with a prefix such as "step_");
  # unfinished ones carry an orbax tmp suffix and are never model checkpoints yet. A finished step with
  # an item deleted is listed (and found damaged), never silently passed over.
  out = {}
  for d in manager_dir.iterdir():
    digits = d.name.rsplit("_", 1)[-1]
    if d.is_dir() and digits.isdigit() and _is_written_checkpoint(d):
      out[int(digits)] = d
  return out


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps (sorted) of the training checkpoints in ``workdir``, damaged ones included."""
  d = Path(workdir) / CHECKPOINTS_SUBDIR
  return sorted(_step_dirs(d)) if d.is_dir() else []


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


def _pick_step(manager_dir: Path, steps: Mapping[int, Path], metric: str | None,
               mode: str | None) -> tuple[int, str, str]:
  """``(step, 'best' | 'latest', why)``: the best of ``steps`` by ``metric``, else the latest."""
  metrics = {s: m for s, p in steps.items() if isinstance(m := _read_metrics(p), Mapping)}
  if metric is None:
    root = _root_metadata(manager_dir)
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
    return latest, "latest", f"latest step {latest} (no best-metric recorded)"
  mode = mode or _infer_mode(metric)
  if mode not in ("min", "max"):
    raise CheckpointError(f"best mode must be 'min' or 'max', got {mode!r}")
  pick = (min if mode == "min" else max)(scored, key=lambda s: (scored[s], s if mode == "max" else -s))
  return pick, "best", f"best step {pick} by {metric}={scored[pick]:g} ({mode})"


def best_step(manager_dir: str | os.PathLike, metric: str | None = None,
              mode: str | None = None) -> tuple[int, str]:
  """Picks the step to load from a ``CheckpointManager`` directory (its files are not verified).

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
  step, _, why = _pick_step(d, steps, metric, mode)
  return step, why


@dataclasses.dataclass(frozen=True)
class Choice:
  """The checkpoint directory :func:`choose_checkpoint` resolved a path to.

  Attributes:
    path: the checkpoint directory to read.
    step: its training step (None for a checkpoint written by :func:`save_model`).
    weights: ``best`` or ``latest`` (chosen among a workdir's steps), ``step`` (a step directory named
      directly) or ``saved`` (a :func:`save_model` checkpoint).
    why: how it was chosen, with every damaged step that was passed over.
    damaged: ``{step: problem}`` of the steps passed over.
  """

  path: Path
  step: int | None
  weights: str
  why: str
  damaged: Mapping[int, str] = dataclasses.field(default_factory=dict)


def _step_of(ckpt: Path) -> int | None:
  # A training step directory: named by its number, inside checkpoints/ or holding the train item.
  digits = ckpt.name.rsplit("_", 1)[-1]
  in_manager = ckpt.parent.name == CHECKPOINTS_SUBDIR or (ckpt / TRAIN_ITEM).is_dir()
  return int(digits) if digits.isdigit() and in_manager else None


def _choose_in_manager(mgr: Path, metric: str | None, mode: str | None, items: Sequence[str],
                       skip: Mapping[int, str]) -> Choice:
  """The best (else latest) intact step of manager directory ``mgr``, passing over damaged ones."""
  steps = _step_dirs(mgr)
  damaged = {s: why for s, why in skip.items() if s in steps}
  while len(damaged) < len(steps):
    left = {s: p for s, p in steps.items() if s not in damaged}
    step, weights, why = _pick_step(mgr, left, metric, mode)
    problem = damage(left[step], items)
    if problem is None:
      for s, bad in sorted(damaged.items(), reverse=True):
        log.warning("step %d is damaged: %s; using step %d", s, bad, step)
      notes = "".join(f"; step {s} is damaged: {bad}" for s, bad in sorted(damaged.items(), reverse=True))
      return Choice(left[step], step, weights, why + notes, damaged)
    damaged[step] = problem
  listing = "; ".join(f"step {s}: {bad}" for s, bad in sorted(damaged.items(), reverse=True))
  raise DamagedCheckpointError(
      f"every checkpoint step in {mgr} is damaged ({listing}); nothing was changed on disk. Restore the "
      "files from a backup, or train again in a new --workdir")


def choose_checkpoint(path: str | os.PathLike, *, metric: str | None = None, mode: str | None = None,
                      items: Sequence[str] = (MODEL_ITEM, VARIABLES_ITEM),
                      skip: Mapping[int, str] | None = None) -> Choice:
  """Resolves a model checkpoint, a step directory, a ``checkpoints/`` directory or a training workdir
  to the intact checkpoint directory to load (see :func:`best_step`); ``items`` are the items that
  will be read, verified against the checksums. A workdir's damaged steps are passed over with a
  warning ("step 8 is damaged: …; using step 6"), as are the steps in ``skip`` (``{step: problem}``).

  Returns:
    A new :class:`Choice`; nothing on disk is changed.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    DamagedCheckpointError: a checkpoint named directly is damaged, or every step of a workdir is.
    CheckpointError: if ``path`` is not a jaxft checkpoint or workdir.
  """
  p = Path(path).absolute()
  if not p.exists():
    raise FileNotFoundError(f"no such checkpoint: {p}")
  if _is_written_checkpoint(p):
    problem = damage(p, items)
    if problem is not None:
      raise DamagedCheckpointError(f"checkpoint {p} is damaged: {problem}. Load another step, or restore "
                                   "the files from a backup")
    step = _step_of(p)
    return Choice(p, step, "saved" if step is None else "step", f"checkpoint {p}")
  for mgr in (p / CHECKPOINTS_SUBDIR, p):
    if mgr.is_dir() and _step_dirs(mgr):
      choice = _choose_in_manager(mgr, metric, mode, items, skip or {})
      log.info("loading %s from %s", choice.why, mgr)
      return choice
  raise CheckpointError(
      f"{p} is not a jaxft checkpoint: expected the items '{MODEL_ITEM}/' and '{VARIABLES_ITEM}/' "
      f"(written by jaxft.checkpoint.save_model) or a training workdir with "
      f"'{CHECKPOINTS_SUBDIR}/<step>/'")


def find_checkpoint(path: str | os.PathLike, *, metric: str | None = None,
                    mode: str | None = None) -> Path:
  """The directory :func:`choose_checkpoint` picks (same arguments and errors)."""
  return choose_checkpoint(path, metric=metric, mode=mode).path


def _read_record(ckpt: Path) -> dict[str, Any]:
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      record = ckptr.restore(ckpt, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))[
          MODEL_ITEM]
  except (ValueError, KeyError, OSError) as e:
    raise CheckpointError(f"{ckpt}: the '{MODEL_ITEM}' item cannot be read: {str(e)[:300]}") from None
  if not isinstance(record, Mapping) or record.get("format") != FORMAT:
    got = record.get("format") if isinstance(record, Mapping) else type(record).__name__
    raise CheckpointError(f"{ckpt} is not a jaxft checkpoint: model item has format {got!r}, "
                          f"expected {FORMAT!r}")
  return dict(record)


def _restore_model(ckpt: Path, item: str) -> Model:
  """The :class:`Model` of checkpoint directory ``ckpt``, its variables read from ``item``."""
  record = _read_record(ckpt)
  spec = ModelSpec.from_dict(record["spec"])
  target = {"batch_stats": {}, **abstract_variables(spec)}  # saved even when empty (a folded model)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(ckpt, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
  except (ValueError, KeyError, OSError) as e:
    raise CheckpointError(f"{ckpt}: stored variables do not fit the stored spec (or cannot be read): "
                          f"{str(e)[:300]}") from None
  variables = jax.tree.map(np.asarray, _plain(restored[item]))
  return Model(spec=spec, variables=variables, meta=dict(record.get("meta") or {}),
               history=tuple(dict(h) for h in record.get("history") or ()))


def _load(path: str | os.PathLike, item: str, metric: str | None, mode: str | None) -> Model:
  """The model of the intact checkpoint ``path`` resolves to; in a workdir, a step that fails to read
  is passed over like a damaged one. Its meta records the choice (:data:`LOAD_META_KEYS`)."""
  skip: dict[int, str] = {}
  while True:
    choice = choose_checkpoint(path, metric=metric, mode=mode, items=(MODEL_ITEM, item), skip=skip)
    try:
      model = _restore_model(choice.path, item)
    except CheckpointError as e:
      if choice.weights not in ("best", "latest"):
        raise
      skip[choice.step] = str(e).split(": ", 1)[-1]
      continue
    meta = {**model.meta, "checkpoint_step": choice.step, "weights": choice.weights, "weights_item": item,
            "checkpoint_why": choice.why}
    return model.replace(meta=meta)


def load_model(path: str | os.PathLike, *, metric: str | None = None, mode: str | None = None) -> Model:
  """Loads a :class:`Model` saved by :func:`save_model`, or the best/latest step of a training workdir.

  Every file read is first checked against the checksums written with it. In a workdir a damaged step
  is passed over with a warning naming it, and the best (else latest) intact step is loaded.

  Args:
    path: a checkpoint directory, a training workdir, its ``checkpoints/`` directory or a step directory.
    metric: for workdirs, the recorded metric that defines the best step (see :func:`best_step`).
    mode: ``min`` or ``max`` for ``metric``.

  Returns:
    A new :class:`Model` whose network is rebuilt from the stored spec; variables are numpy arrays. Its
    meta also says what was loaded (never saved again): ``checkpoint_step`` (int, None for a
    :func:`save_model` checkpoint), ``weights`` (``best`` / ``latest`` / ``step`` / ``saved``, see
    :class:`Choice`), ``weights_item`` (``variables``, or ``ema`` from :func:`load_ema_model`) and
    ``checkpoint_why`` (how the step was chosen, naming any damaged step passed over).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    DamagedCheckpointError: the checkpoint named is damaged, or every step of the workdir is.
    CheckpointError: if ``path`` is not a jaxft checkpoint, or its variables do not fit its spec.
  """
  return _load(path, VARIABLES_ITEM, metric, mode)


def load_ema_model(path: str | os.PathLike, *, metric: str | None = None,
                   mode: str | None = None) -> Model:
  """Loads the EMA weights of a training workdir (or one of its step directories) as a :class:`Model`.

  :func:`load_model` on the same path gives the raw weights; this gives the averaged ones with the same
  structure, metadata and history (same arguments and errors as :func:`load_model`; ``weights_item``
  is ``ema``).

  Raises:
    CheckpointError: the checkpoint has no ``ema`` item (the run had EMA off).
  """
  ckpt = choose_checkpoint(path, metric=metric, mode=mode).path
  _read_record(ckpt)  # not a jaxft checkpoint at all: say that first
  if not (ckpt / EMA_ITEM).is_dir():
    raise CheckpointError(f"{ckpt} has no '{EMA_ITEM}' item: the run was trained without "
                          "EMA (config.ema.decay = 0)")
  return _load(path, EMA_ITEM, metric, mode)


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
  # best_fn: orbax writes a step's metrics to disk only when it tracks a best one; best_step (evaluate's
  # default choice) reads them from there.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda m: m[VAL_TOP1],
                                         best_mode="max", enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(workdir / CHECKPOINTS_SUBDIR, options=options, item_names=TRAIN_ITEMS)


def _first_non_finite(name: str, tree: Any) -> str | None:
  # The path of the first floating-point leaf holding a NaN or infinity (host arrays), else None.
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      return name + "/" + jax.tree_util.keystr(path, simple=True, separator="/")
  return None


def save_train_state(mngr: ocp.CheckpointManager, state: "TrainState", model: Model,
                     val_top1: float | None = None, extra: Mapping[str, Any] | None = None) -> None:
  """Saves ``state`` (with ``model``'s structure, meta and history) at ``state.step``; blocks until
  written, then records the step's checksums. ``val_top1`` is recorded as the step's metric; ``extra``
  are more array trees by item name (one of ``TRAIN_ITEMS``, e.g. ``DELTA_ITEM``). Nothing is mutated.

  Raises:
    NonFiniteStateError: a leaf of the state is not finite; nothing is written.
  """
  step = int(state.step)
  host = {VARIABLES_ITEM: jax.device_get(state.variables()),
          OPT_STATE_ITEM: jax.device_get(state.opt_state)}
  if state.ema is not None:
    # Stored as whole variables (frozen leaves included), so the item alone rebuilds a model.
    host[EMA_ITEM] = jax.device_get(state.ema_variables())
  host.update({k: jax.device_get(_plain(v)) for k, v in (extra or {}).items()})
  for name, tree in host.items():
    if (leaf := _first_non_finite(name, tree)) is not None:
      raise NonFiniteStateError(leaf)
  train_record: dict[str, Any] = {"step": step}
  if state.reg:  # the adaptive weights in effect and the controller's memory (exact: float32 in JSON)
    train_record[ADAPTIVE_KEY] = state.reg_record()
    if (leaf := _first_non_finite(ADAPTIVE_KEY, state.reg)) is not None:
      raise NonFiniteStateError(leaf)
  items = {k: ocp.args.StandardSave(v) for k, v in host.items()}
  items.update({MODEL_ITEM: ocp.args.JsonSave(model_record(model)),
                TRAIN_ITEM: ocp.args.JsonSave(train_record)})
  mngr.save(step, args=ocp.args.Composite(**items),
            metrics=None if val_top1 is None else {VAL_TOP1: val_top1}, force=True)
  mngr.wait_until_finished()
  step_dir = Path(mngr.directory) / str(step)
  if jax.process_index() == 0 and step_dir.is_dir():
    write_checksums(step_dir)


def restore_train_state(mngr: ocp.CheckpointManager, step: int, template: "TrainState") -> "TrainState":
  """Returns the train state saved at ``step``, with the structure and dtypes of ``template`` (which is
  not mutated). The files are not verified here: :func:`resume_train_state` does that.

  Raises:
    CheckpointError: the checkpoint does not fit ``template`` (a changed model or optimizer).
  """
  items = {VARIABLES_ITEM: ocp.args.StandardRestore(jax.device_get(template.variables())),
           OPT_STATE_ITEM: ocp.args.StandardRestore(jax.device_get(template.opt_state))}
  if template.ema is not None:
    items[EMA_ITEM] = ocp.args.StandardRestore(jax.device_get(template.ema_variables()))
  if template.reg:
    items[TRAIN_ITEM] = ocp.args.JsonRestore()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    if template.reg:
      template = template.with_reg_record(restored[TRAIN_ITEM].get(ADAPTIVE_KEY, {}))
  except (ValueError, KeyError, OSError) as e:
    raise CheckpointError(
        f"the checkpoint at step {step} in {mngr.directory} does not fit the model/optimizer this "
        f"config builds (changed surgery or optimizer settings?): {str(e)[:500]}. Use a new --workdir, "
        "or start from that checkpoint as pretrained weights (--config.model.pretrained=WORKDIR).") from None
  ema = restored[EMA_ITEM] if template.ema is not None else None
  return template.with_variables(restored[VARIABLES_ITEM], restored[OPT_STATE_ITEM], step=step,
                                 ema_variables=ema)


def restore_train_item(mngr: ocp.CheckpointManager, step: int, item: str, template: Any) -> Any | None:
  """The array tree saved as ``item`` (e.g. ``DELTA_ITEM``) at ``step``, with ``template``'s structure and
  dtypes (not mutated); None when that step has no such item (it was written without it).

  Raises:
    DamagedCheckpointError: the item's files changed since they were written.
    CheckpointError: the item does not fit ``template``.
  """
  step_dir = Path(mngr.directory) / str(step)
  if not (step_dir / item).is_dir():
    return None
  if (problem := damage(step_dir, [item])) is not None:
    raise DamagedCheckpointError(f"step {step} in {mngr.directory}: {problem}; restore it from a backup "
                                 "or use a new --workdir")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(jax.device_get(_plain(template)))}))
  except (ValueError, KeyError, OSError) as e:
    raise CheckpointError(f"the item {item!r} of step {step} in {mngr.directory} does not fit this "
                          f"config's model: {str(e)[:300]}. Use a new --workdir") from None
  return restored[item]


def _set_aside(mngr: ocp.CheckpointManager, damaged: Mapping[int, str], resumed: int) -> None:
  """Moves the damaged steps (all newer than ``resumed``) to ``WORKDIR/checkpoints_damaged/`` so that
  the run can write them again; nothing is deleted. Then the manager forgets them."""
  manager_dir = Path(mngr.directory)
  aside = manager_dir.parent / DAMAGED_SUBDIR
  for step, problem in sorted(damaged.items(), reverse=True):
    dest = aside / str(step)
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      n = 1
      while dest.exists():  # damaged before, at the same step: keep both
        n += 1
        dest = aside / f"{step}.{n}"
      shutil.move(str(manager_dir / str(step)), dest)
    log.warning("step %d is damaged: %s; using step %d (the damaged step is moved to %s)", step, problem,
                resumed, dest)
  if damaged and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("jaxft: damaged checkpoints set aside")
  mngr.reload()


def resume_train_state(mngr: ocp.CheckpointManager,
                       template: "TrainState") -> tuple["TrainState", int | None]:
  """The train state of the newest intact step of ``mngr`` and that step; ``(template, None)`` when
  there is no step. ``template`` (structure and dtypes) is not mutated.

  Each step's files are checked against its checksums first. Damaged steps newer than the one resumed
  are reported by name with a warning and moved to ``WORKDIR/checkpoints_damaged/`` (so that they can be
  written again; nothing is deleted). A step written without checksums that fails to restore counts as
  damaged too.

  Raises:
    DamagedCheckpointError: no step is intact (nothing is moved).
    CheckpointError: an intact step does not fit ``template`` (a changed model or optimizer).
  """
  manager_dir = Path(mngr.directory)
  items = [VARIABLES_ITEM, MODEL_ITEM, OPT_STATE_ITEM, TRAIN_ITEM] + [EMA_ITEM] * (template.ema is not None)
  damaged: dict[int, str] = {}
  unreadable: list[CheckpointError] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = manager_dir / str(step)
    problem = damage(step_dir, items)
    if problem is None:
      try:
        state = restore_train_state(mngr, step, template)
      except CheckpointError as e:
        if _read_checksums(step_dir) is not None:  # its files are as written: the config changed
          raise
        unreadable.append(e)
        problem = f"it cannot be restored ({str(e).split(': ', 1)[-1][:300]})"
      else:
        _set_aside(mngr, damaged, step)
        return state, step
    damaged[step] = problem
  if unreadable and len(unreadable) == len(damaged):  # no checksum failed: a changed config, likely
    raise unreadable[0]
  if damaged:
    listing = "; ".join(f"step {s}: {bad}" for s, bad in damaged.items())
    raise DamagedCheckpointError(
        f"no intact checkpoint to resume in {manager_dir} ({listing}); nothing was changed on disk. "
        "Restore the files from a backup, move the checkpoints/ folder away to start over, or use a new "
        "--workdir")
  return template, None
