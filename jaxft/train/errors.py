"""The one error a training run raises for a problem the user can fix, and the exit codes of the CLIs.

The exit codes are a contract with schedulers and shell scripts (``train && evaluate``), documented in
the README: each cause has its own, so a caller can tell "fix the input" from "rerun to resume".
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0  # done
EXIT_BAD_INPUT = 2  # bad config, data, weights or usage (also: the workdir cannot be written)
EXIT_NONFINITE = 3  # the loss became non-finite (NaN stop); the last good checkpoint is kept
EXIT_DAMAGED_CHECKPOINT = 4  # a checkpoint is damaged and no intact step could be used instead
EXIT_WORKDIR_BUSY = 5  # another process holds the workdir's lock
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving a checkpoint; rerun resumes
EXIT_SIGINT = 130  # 128 + SIGINT: interrupted before anything was saved


class TrainError(RuntimeError):
  """A run that cannot go on; the message names the problem and the fix.

  ``exit_code`` is what the CLI exits with (one of the ``EXIT_*`` constants; default bad input).
  """

  def __init__(self, message: str = "", *, exit_code: int = EXIT_BAD_INPUT):
    super().__init__(message)
    self.exit_code = exit_code


def check_config(config: Any) -> None:
  """Checks ``config`` (an ``ml_collections.ConfigDict``, never mutated) against the schema before
  anything is loaded (:func:`jaxft.validate.validate`).

  Raises:
    TrainError: one line per violation, e.g. ``config.optim.lr = -0.1: must be > 0``.
  """
  from jaxft import validate  # pylint: disable=g-import-not-at-top
  problems = validate.validate(config)
  if problems:
    raise TrainError("\n".join(problems))
