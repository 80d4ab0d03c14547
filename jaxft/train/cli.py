"""``python -m jaxft.train --config configs/X.py --workdir DIR [--config.a.b=v …]``: flags only.

``main`` parses the flags and calls :func:`jaxft.train.loop.train_and_evaluate`, which does the work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from jaxft import checkpoint as ckpt_lib
from jaxft import cpu
from jaxft import data as data_lib
from jaxft.train import errors
from jaxft.train.errors import TrainError
from jaxft.train.loop import train_and_evaluate


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO chatter from the CLI's log; its warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  """CLI entry point: only parses flags, then calls :func:`train_and_evaluate`; exits 2 on a
  :class:`TrainError` (or a data, conversion or checkpoint error), printing it."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from jaxft import convert  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("runs", Path(flags.FLAGS["config"].config_filename).stem)
  try:
    result = train_and_evaluate(config, workdir)
  except (TrainError, data_lib.DataError, convert.ConversionError, ckpt_lib.CheckpointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", errors.EXIT_BAD_INPUT))
  print(json.dumps({k: v for k, v in result.items() if k != "per_class"}))


def define_flags() -> None:
  """``--config`` (a configs/*.py file, locked: unknown override keys are errors) and ``--workdir``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default runs/<config>).")
  flags.mark_flags_as_required(["config"])


def run() -> None:
  """The process entry point: the CPU backend first (it may re-exec this process under tcmalloc, so
  before any JAX computation), then flags, then :func:`main`."""
  cpu.enable(relaunch=True)
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
