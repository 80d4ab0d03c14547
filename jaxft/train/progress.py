"""What the user sees and does while a run goes: a progress bar or log lines; Ctrl-C / SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any, Mapping


class Progress:
  """A tqdm bar on a TTY (``mode`` ``auto``) or when asked (``bar``), plain log lines otherwise."""

  def __init__(self, start: int, total: int, mode: str, log_every: int):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self.bar = None
    if use_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self.total = total
    self.log_every = max(1, log_every)
    self.t0 = time.time()
    self.start = start

  def update(self, step: int, m: Mapping[str, float]) -> None:
    """Shows the metrics ``m`` of ``step`` (``loss``, ``top1``, ``lr``, ``images_per_s``, ``data_wait``)."""
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                           img_s=f"{m['images_per_s']:.0f}", wait=f"{m['data_wait']:.0%}")
    elif step % self.log_every == 0 or step == self.total:
      elapsed = time.time() - self.t0
      eta = elapsed / max(step - self.start, 1) * (self.total - step)
      logging.info("step %d/%d loss %.4f top1 %.3f lr %.3g | %.0f img/s, data wait %.0f%% | ETA %s",
                   step, self.total, m["loss"], m["top1"], m["lr"], m["images_per_s"],
                   100 * m["data_wait"], time.strftime("%H:%M:%S", time.gmtime(eta)))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class StopFlag:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step.

  A second SIGINT (Ctrl-C pressed again) raises ``KeyboardInterrupt`` at once, without waiting for the
  checkpoint (the CLI reports it in one line; the previous checkpoint is intact, writes being atomic). A
  second SIGTERM changes nothing: schedulers send it again, and the checkpoint is on its way.
  """

  def __init__(self):
    self.signal: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self) -> "StopFlag":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signal is None:
      logging.warning("received %s: stopping after this step's checkpoint%s", signal.Signals(signum).name,
                      " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    self.signal = signum

  def __exit__(self, *exc: Any) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
