#!/usr/bin/env python
"""Export a jaxft model to PyTorch weights: a ``.pth`` state dict or a ``.safetensors`` file.

  python tools/export_torch.py runs/cifar10 model.pth             # best (else latest) step of a workdir
  python tools/export_torch.py out/resnet50 model.safetensors     # a save_model / converter directory
  python tools/export_torch.py runs/cifar10 model.pth --ema       # the run's EMA weights

CHECKPOINT is anything ``jaxft.load_model`` reads: a model directory, a training workdir, its
``checkpoints/`` directory or one step directory. The file holds plain tensors under torch names
(``torch.load(path, weights_only=True)`` reads a ``.pth``); build the matching module with
``jaxft.export.to_torch(model)``, or, for an unmodified torchvision ResNet, load it into
``torchvision.models.resnet50()`` with ``strict=True`` (docs/export.md).

Exit status (jaxft's CLI contract): 0 written; 2 bad input, one line ``error: …``; 4 a damaged
checkpoint. ``--debug`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

EXIT_BAD_INPUT, EXIT_DAMAGED = 2, 4  # as jaxft.train.errors (not imported: --help stays instant)


def _export(args: argparse.Namespace) -> str:
  from jaxft import evaluate, export  # pylint: disable=import-outside-toplevel — after parsing
  out = Path(args.out)
  if out.suffix.lower() not in export.SUFFIXES:  # before the (slow) load
    raise export.ExportError(f"cannot write {out.name!r}: unknown file type {out.suffix or '(none)'!r}; "
                             f"name the output {' or '.join(f'*{s}' for s in export.SUFFIXES)}")
  if out.exists() and not args.force:
    raise export.ExportError(f"{out.absolute()} exists; pass --force to overwrite it")
  model, info = evaluate.load_for_eval(args.checkpoint, ema=args.ema)
  written = export.save_torch(model, out, force=args.force)
  n = len(export.torch_state_dict(model, counters=False))
  return (f"wrote {written}: {n} tensors of {model.meta.get('arch') or model.spec.family} "
          f"({evaluate.describe_weights(info)}), {len(model.history)} surgery op(s) in its history")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("checkpoint", help="model directory, training workdir or step directory")
  parser.add_argument("out", help="file to write: *.pth, *.pt or *.safetensors")
  parser.add_argument("--ema", action="store_true", help="export the run's EMA weights")
  parser.add_argument("--force", action="store_true", help="overwrite OUT")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    line = _export(args)
  except Exception as e:  # noqa: BLE001 — the one boundary: every failure is one line
    if args.debug:
      traceback.print_exc()
    from jaxft import checkpoint  # pylint: disable=import-outside-toplevel
    damaged = (isinstance(e, checkpoint.DamagedCheckpointError)
               or getattr(e, "exit_code", None) == EXIT_DAMAGED)
    bad = isinstance(e, (ValueError, OSError))
    text = " ".join(str(e).split()) or type(e).__name__
    if not (bad or damaged):
      text = f"internal error, {type(e).__name__}: {text} (please report it; --debug shows the traceback)"
    print(f"error: {text}", file=sys.stderr)
    return EXIT_DAMAGED if damaged else (EXIT_BAD_INPUT if bad else 1)
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
