"""``python -m jaxft.train``: see :mod:`jaxft.train.cli`."""

import sys

if __name__ == "__main__":
  try:
    from jaxft.train import cli  # imports JAX: Ctrl-C can come here too
  except KeyboardInterrupt:
    print("interrupted before the run started: nothing was saved", file=sys.stderr)
    sys.exit(130)  # jaxft.train.errors.EXIT_SIGINT
  cli.run()
