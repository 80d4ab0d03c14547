"""Train metrics: read one step late (so the host never stalls the device), checked, timed, written.

A non-finite train loss or parameter norm, validation loss or train state stops the run with a
:class:`TrainError` of exit code 3 naming the last good checkpoint: the loop never checkpoints such a
state, so every checkpoint it wrote has finite parameters and, when validated, a finite validation loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax

from jaxft import report
from jaxft.train.progress import Progress
from jaxft.train.errors import EXIT_NONFINITE, TrainError


class TrainMonitor:
  """Holds the metrics of the last step until the next one is dispatched, then checks and logs them.

  Attributes:
    last_good: the step of the last checkpoint written from a finite state (None: none yet), whose
      validation loss was finite when it was validated.
  """

  def __init__(self, writer: report.MetricWriter, progress: Progress, *, batch_size: int,
               total_steps: int, log_every: int, checkpoint_dir: Path, last_good: int | None):
    self.writer, self.progress = writer, progress
    self.batch_size, self.total_steps, self.log_every = batch_size, total_steps, log_every
    self.checkpoint_dir = checkpoint_dir
    self.last_good = last_good
    self._pending: tuple[int, dict[str, Any]] | None = None
    self._wait = 0.0
    self._last = time.time()

  def waited(self, seconds: float) -> None:
    """Counts time the loop spent waiting for data."""
    self._wait += seconds

  def dispatched(self, step: int, metrics: dict[str, Any]) -> None:
    """Takes the (still computing) metrics of ``step``; logs the previous step's."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Checks and logs the pending metrics, if any.

    Raises:
      TrainError: a non-finite loss or parameter norm, naming the last good checkpoint (exit code 3).
    """
    if self._pending is None:
      return
    step, m = self._pending
    self._pending = None
    m = self._checked(step, m)
    now = time.time()
    dt = max(now - self._last, 1e-9)
    self._last = now
    m.update(images_per_s=self.batch_size / dt, data_wait=min(self._wait / dt, 1.0))
    self._wait = 0.0
    if step % self.log_every == 0 or step == self.total_steps:
      self.writer.write(step, "train", m)
    self.progress.update(step, m)

  def saved(self, step: int) -> None:
    self.last_good = step

  def check_val(self, step: int, val: dict[str, Any]) -> None:
    """Raises the NaN stop if a validation loss of ``step`` (main head, tasks, EMA) is not finite."""
    for name, v in (("", val), ("EMA ", val.get("ema") or {})):
      for task, m in [("", v)] + [(f" ({t} head)", m) for t, m in v.get("tasks", {}).items()]:
        if "loss" in m and not math.isfinite(m["loss"]):
          raise self.stop(step, f"the {name}validation loss{task} became {m['loss']}")

  def stop(self, step: int, what: str) -> Exception:
    """The NaN-stop error (exit code 3): ``what`` happened at ``step``; names the last good checkpoint."""
    kept = (f"The last good checkpoint (step {self.last_good}) is kept in {self.checkpoint_dir}."
            if self.last_good is not None else "No checkpoint had been written yet.")
    return TrainError(f"{what} at step {step}; stopped. {kept} Lower optim.lr, enable "
                       "optim.clip_norm, or check the data.", exit_code=EXIT_NONFINITE)

  def _checked(self, step: int, m: dict[str, Any]) -> dict[str, float]:
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    bad = [k for k in ("loss", "param_norm") if not math.isfinite(m[k])]
    if bad:
      raise self.stop(step, f"loss became {m['loss']}" if "loss" in bad
                      else "the parameters became non-finite")
    return m
