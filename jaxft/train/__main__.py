"""``python -m jaxft.train``: see :mod:`jaxft.train.cli`."""

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
  from jaxft.train import cli  # pylint: disable=g-import-not-at-top
  cli.run()
