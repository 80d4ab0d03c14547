"""``python -m jaxft.cpu build [--force]`` builds the oneDNN wrapper into the cache ahead of time;
``python -m jaxft.cpu status`` prints what the CPU backend would use (builds nothing)."""

from __future__ import annotations

import argparse
import sys

import jaxft.cpu


def main(argv: list[str] | None = None) -> int:
  """Runs the command in ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
  p = argparse.ArgumentParser(prog="python -m jaxft.cpu", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  build = sub.add_parser("build", help="compile and load the oneDNN convolutions (cached)")
  build.add_argument("--force", action="store_true", help="rebuild even when the library is cached")
  sub.add_parser("status", help="print the allocator, oneDNN and XLA flags in use (builds nothing)")
  args = p.parse_args(argv)
  from jaxft.cpu import onednn  # pylint: disable=g-import-not-at-top
  if args.command == "build":
    if onednn.status().startswith("off"):
      print(f"oneDNN convolutions {onednn.status()}: nothing built")
      return 0
    try:
      path = onednn.build(force=args.force)
      ok = onednn.load()
    except (RuntimeError, onednn.OneDNNUnavailableError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    print(f"built {path}" if ok else f"built {path}, but loading failed: {onednn.status()}")
    return 0 if ok else 1
  print(jaxft.cpu.status())
  return 0


if __name__ == "__main__":
  sys.exit(main())
