"""Fine-tune a model: python -m jaxft.train --config configs/X.py [--workdir DIR] [--config.a.b=v ...]

  --config FILE     a configs/*.py file (required); --config.a.b=v overrides one field of it
  --workdir DIR     checkpoints, metrics and plots (default runs/<config name>); rerun to resume
  --debug           raw tracebacks instead of one-line errors

Exit codes: 0 done, 2 bad input, 3 non-finite loss, 4 damaged checkpoint, 5 workdir busy,
75 interrupted after a checkpoint (rerun to resume), 130 interrupted before one. See jaxft.train.cli.
"""

import os
import signal


def _exit_at_once(signum: int, frame: object) -> None:
  """A signal while the CLI itself is imported (it imports JAX): one line, no traceback, exit now."""
  del frame
  os.write(2, b"interrupted before the run started: nothing was saved\n")
  os._exit(128 + signum)  # pylint: disable=protected-access  # 130 for SIGINT (jaxft.train.errors)


if __name__ == "__main__":
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, _exit_at_once)
  # Under tcmalloc before the CLI's imports load JAX and orbax (~1.7 s), not after: the relaunched
  # process starts from scratch, so whatever was imported before the exec is paid twice.
  from jaxft.cpu import allocator  # pylint: disable=g-import-not-at-top  # loads no JAX
  allocator.relaunch_with_tcmalloc()
  from jaxft.train import cli  # pylint: disable=g-import-not-at-top
  cli.run()
