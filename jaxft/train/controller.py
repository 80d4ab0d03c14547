"""The adaptive weights during a run: at each evaluation, measure the gap and move them.

The gap is ``val_loss − train_loss``, both the main head's mean cross-entropy measured the same way:
eval mode (running BN statistics, no dropout, no augmentation) with the raw (not EMA) weights, on the
validation set and on a fixed random subset of the training set (``config.adaptive.train_images``
images, chosen once from ``config.seed``). Both are functions of the parameters only, so a resumed run
measures what the uninterrupted one did. Each adaptive weight then moves by :func:`jaxft.adapt.move`;
the new values go into the train state (``TrainState.reg``, inputs of the jitted step: no
recompilation) and are checkpointed with it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxft import adapt
from jaxft import data as data_lib
from jaxft.train import evaluation
from jaxft.train.errors import TrainError
from jaxft.train.mesh import DataMesh
from jaxft.train.objective import Objective
from jaxft.train.state import TrainState

ARROWS = {adapt.UP: "up", adapt.HOLD: "held", adapt.DOWN: "down"}


@dataclasses.dataclass(frozen=True)
class Controller:
  """Moves the adaptive weights of a train state at each evaluation.

  Attributes:
    specs: ``{config key: Adaptive}`` of the adaptive weights.
    factor, band: the rule's ``f`` and ``h`` (``config.adaptive``).
    train_eval: scores the fixed training subset in eval mode.
    mesh: where the new values go (replicated, like the rest of the state).
  """

  specs: Mapping[str, adapt.Adaptive]
  factor: float
  band: float
  train_eval: evaluation.Evaluator
  mesh: DataMesh

  def __call__(self, state: TrainState, val: Mapping[str, Any]) -> tuple[TrainState, dict[str, float]]:
    """Returns the state with the moved weights (``state`` is not mutated) and the record to log:
    ``adaptive_train_loss``, ``adaptive_gap`` and ``reg/<key>`` (the new values)."""
    train_loss = self.train_eval.main_loss(state)
    gap = float(val["loss"]) - train_loss
    values, modes = jax.device_get((state.reg, state.reg_mode))
    new_values, new_modes = {}, {}
    for key, spec in self.specs.items():
      new_values[key], new_modes[key] = adapt.move(float(values[key]), int(modes[key]), gap, spec,
                                                   self.factor, self.band)
    logging.info("adaptive: gap %.4f (val %.4f - train %.4f): %s", gap, float(val["loss"]), train_loss,
                 ", ".join(f"{k} {v:.4g} ({ARROWS[new_modes[k]]})" for k, v in new_values.items()))
    record = {"adaptive_train_loss": train_loss, "adaptive_gap": gap}
    record.update({f"reg/{k}": v for k, v in new_values.items()})
    reg = self.mesh.replicate({k: np.float32(v) for k, v in new_values.items()})
    reg_mode = self.mesh.replicate({k: np.int32(m) for k, m in new_modes.items()})
    return state.replace(reg=reg, reg_mode=reg_mode), record


def train_subset(train_ds: data_lib.Dataset, n: int, seed: int) -> data_lib.Dataset:
  """``n`` images of ``train_ds`` (all when it has fewer) drawn once from ``seed``, in their order in
  ``train_ds`` (a new dataset; ``train_ds`` is not mutated)."""
  n = min(n, len(train_ds))
  idx = np.sort(np.random.default_rng(seed).choice(len(train_ds), n, replace=False))
  return dataclasses.replace(train_ds, images=train_ds.images[idx], labels=train_ds.labels[idx])


def check_terms(specs: Mapping[str, adapt.Adaptive]) -> None:
  """Raises a :class:`TrainError` for an adaptive ``loss.<name>`` that is no loss weight of
  :class:`~jaxft.train.objective.Objective` (its weight would never be read)."""
  weights = {f.name for f in dataclasses.fields(Objective) if f.type in ("float", float)}
  for key in specs:
    name = key[len(adapt.LOSS_PREFIX):]
    if key.startswith(adapt.LOSS_PREFIX) and name not in weights:
      raise TrainError(f"config.{key} cannot be adaptive: {name!r} is not a loss term weight "
                       f"(adaptive loss weights: {', '.join(sorted(weights))})")


def build_controller(config: Any, specs: Mapping[str, adapt.Adaptive], eval_fn: Callable,
                     train_ds: data_lib.Dataset, val_ds: data_lib.Dataset | None,
                     mesh: DataMesh) -> Controller | None:
  """The run's controller (None when no weight is adaptive), from ``config.adaptive`` (read only).

  Raises:
    TrainError: an adaptive weight without a validation set, or an adaptive loss field that is no
      term weight.
  """
  if not specs:
    return None
  check_terms(specs)
  if val_ds is None:
    raise TrainError(f"config.{next(iter(specs))} is adaptive: it needs a validation set (set "
                     "config.data.val_fraction > 0 or config.data.val_source)")
  n = config.adaptive.train_images or len(val_ds)
  subset = train_subset(train_ds, n, config.seed)
  logging.info("adaptive weights %s: gap measured on %d validation and %d training images",
               ", ".join(f"{k} = {s} (start {s.start:.4g})" for k, s in specs.items()), len(val_ds),
               len(subset))
  return Controller(specs, float(config.adaptive.factor), float(config.adaptive.band),
                    evaluation.Evaluator(eval_fn, subset, (), config.train.eval_batch_size, mesh), mesh)
