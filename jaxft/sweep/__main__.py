"""``python -m jaxft.sweep``: see :mod:`jaxft.sweep.cli`."""

if __name__ == "__main__":
  from jaxft.sweep import cli  # pylint: disable=g-import-not-at-top
  cli.run()
