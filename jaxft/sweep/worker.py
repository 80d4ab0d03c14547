"""One sweep worker: takes trials from the shared study until the sweep's ``--trials`` are used up, and
runs each as a ``train_and_evaluate`` in ``<sweep dir>/trials/<number>``.

A trial's workdir is a function of its number only, so a trial requeued after a kill
(:func:`jaxft.sweep.storage.requeue_own_trials`) resumes its last checkpoint, bit-exactly. Validation
top-1 is reported at every evaluation (``train.eval_every`` and the last step) and the study's pruner may
stop the trial there. A trial's value is its best validation top-1.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import optuna
from optuna.trial import TrialState

from jaxft.sweep import space as space_lib
from jaxft.sweep import storage as storage_lib
from jaxft.train import errors
from jaxft.train.errors import TrainError

TRIALS_SUBDIR = "trials"


def trial_dir(sweep_dir: Path, number: int) -> Path:
  """The workdir of trial ``number``."""
  return sweep_dir / TRIALS_SUBDIR / str(number)


def claim(study: optuna.Study, space: space_lib.Space, budget: int, me: str,
          lock_path: Path) -> optuna.Trial | None:
  """The next trial for this worker: a waiting one (requeued or retried) first, else a new one while
  fewer than ``budget`` trials count (:func:`jaxft.sweep.storage.counted`); None when the sweep is done.

  The count and the creation happen under a ``flock`` on ``lock_path``, so the workers of one machine
  never overshoot ``budget``; sweeps on several machines sharing a study may overshoot by one trial per
  machine that asks at the same instant.
  """
  with open(lock_path, "a+", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if not waiting and sum(storage_lib.counted(t) for t in trials) >= budget:
      return None
    trial = study.ask(dict(space))
    if trial.user_attrs.get(storage_lib.OWNER_ATTR) != me:
      trial.set_user_attr(storage_lib.OWNER_ATTR, me)
  return trial


def _reporter(trial: optuna.Trial) -> Callable[[int, dict[str, Any]], None]:
  """``train_and_evaluate``'s ``on_eval``: reports top-1, raises ``TrialPruned`` when the pruner says so."""

  def on_eval(step: int, val: dict[str, Any]) -> None:
    if step not in _stored(trial).intermediate_values:  # a resumed trial re-evaluates reported steps
      trial.report(float(val["top1"]), step)
    if trial.should_prune():
      raise optuna.TrialPruned(f"pruned at step {step} (val top-1 {val['top1']:.4f})")
  return on_eval


def _stored(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
  return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


class Heartbeat:
  """``with Heartbeat(trial, every_s):`` — records :data:`jaxft.sweep.storage.HEARTBEAT_ATTR` on ``trial``
  every ``every_s`` seconds (never when ``every_s`` is None), from a daemon thread."""

  def __init__(self, trial: optuna.Trial, every_s: float | None):
    self.trial, self.every_s, self.done = trial, every_s, threading.Event()
    self.thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

  def _beat(self) -> None:
    while True:
      try:
        self.trial.set_user_attr(storage_lib.HEARTBEAT_ATTR, time.time())
      except Exception as e:  # pylint: disable=broad-except  # a missed beat is retried, never fatal
        logging.warning("trial %d: heartbeat not recorded: %s", self.trial.number, e)
      if self.done.wait(self.every_s):
        return

  def __enter__(self) -> "Heartbeat":
    if self.every_s is not None:
      self.thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.done.set()
    if self.thread.is_alive():
      self.thread.join()


def _tell(study: optuna.Study, trial: optuna.Trial, *args: Any, **kwargs: Any) -> None:
  """``study.tell``, except when the trial was finished meanwhile by a sweep that took it for dead."""
  try:
    study.tell(trial, *args, **kwargs)
  except optuna.exceptions.UpdateFinishedTrialError:
    logging.warning("trial %d was finished by another worker meanwhile; its result stands", trial.number)


def run_trial(study: optuna.Study, trial: optuna.Trial, base: ml_collections.ConfigDict,
              sweep_dir: Path, heartbeat_s: float | None = None) -> tuple[int, list[str]]:
  """Trains trial ``trial`` and tells the study how it ended (complete with its best top-1, pruned, or
  failed: diverged, or an error). Returns ``(exit code, lines)``: ``(0, [])`` for every ending the
  sweep goes on after, the train CLI's code and message for an error that would repeat, 75 when a
  signal stopped the trial after a checkpoint (it stays RUNNING: a rerun resumes it)."""
  from jaxft.train import cli  # pylint: disable=g-import-not-at-top
  from jaxft.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  workdir = trial_dir(sweep_dir, trial.number)
  logging.info("trial %d: %s in %s", trial.number, trial.params, workdir)
  try:
    with Heartbeat(trial, heartbeat_s):
      result = train_and_evaluate(space_lib.with_params(base, trial.params), workdir,
                                  on_eval=_reporter(trial))
  except optuna.TrialPruned:
    _tell(study, trial, state=TrialState.PRUNED)
    return 0, []
  except Exception as e:  # pylint: disable=broad-except  # each failure is recorded on the trial
    code, lines = cli.describe(e, workdir)
    trial.set_user_attr(storage_lib.ERROR_ATTR, " ".join(lines))
    if isinstance(e, TrainError) and e.exit_code == errors.EXIT_NONFINITE:
      trial.set_user_attr(storage_lib.DIVERGED_ATTR, True)  # a result of its parameters: counted, go on
      code, lines = 0, []
    _tell(study, trial, state=TrialState.FAIL)
    return code, [f"trial {trial.number}: {line}" for line in lines]
  if result.get("interrupted"):
    return errors.EXIT_INTERRUPTED, []
  values = _stored(trial).intermediate_values
  if not values:
    _tell(study, trial, state=TrialState.FAIL)
    return errors.EXIT_BAD_INPUT, ["the sweep needs a validation set to score trials: set "
                                   "config.data.val_fraction > 0 or config.data.val_source"]
  _tell(study, trial, max(values.values()))
  return 0, []


def work(study: optuna.Study, space: space_lib.Space, base: ml_collections.ConfigDict, sweep_dir: Path,
         budget: int, me: str, heartbeat_s: float | None = None) -> tuple[int, list[str]]:
  """Runs trials until none is left (exit code 0) or one ends in an error that would repeat or a
  signal (its code and lines, from :func:`run_trial`); with ``heartbeat_s``, each running trial's
  heartbeat is recorded that often."""
  while True:
    trial = claim(study, space, budget, me, sweep_dir / "claim.lock")
    if trial is None:
      return 0, []
    code, lines = run_trial(study, trial, base, sweep_dir, heartbeat_s)
    if code:
      return code, lines
