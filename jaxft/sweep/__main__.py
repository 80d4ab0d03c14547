"""``python -m jaxft.sweep``: see :mod:`jaxft.sweep.cli`."""

import sys

if __name__ == "__main__":
  if any(a.startswith("--worker=") for a in sys.argv[1:]):
    # A worker trains under tcmalloc: re-exec before the CLI's imports load JAX, not after (they would
    # be paid twice). The coordinator runs no JAX and stays as it is.
    from jaxft.cpu import allocator  # pylint: disable=g-import-not-at-top  # loads no JAX
    allocator.relaunch_with_tcmalloc()
  from jaxft.sweep import cli  # pylint: disable=g-import-not-at-top
  cli.run()
