"""``python -m jaxft.train``: see :mod:`jaxft.train.cli`."""

from jaxft.train import cli

if __name__ == "__main__":
  cli.run()
