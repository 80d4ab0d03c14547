#!/usr/bin/env python
"""Convert PyTorch / safetensors weights into a jaxft checkpoint directory.

  python tools/convert_torch_weights.py resnet56-4bfd9763.th out/resnet56 --arch cifar_resnet56
  python tools/convert_torch_weights.py torchvision:resnet50.IMAGENET1K_V2 out/r50 --num-classes 37

SRC is a ``.pth/.pt/.th/.safetensors`` file or ``torchvision:ARCH[.VARIANT]`` (downloaded once into the
torch hub cache). The output loads with ``jaxft.load_pretrained(OUT)``.

No code in SRC runs: its pickles go through jaxft's restricted unpickler, and a file that needs more than
tensors is refused, naming what it needs. ``--trust-pickle`` lets torch unpickle such a file fully, which
runs code from the file: only for files you made yourself (see docs/security.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxft import checkpoint, convert
from jaxft.models.model import count_params


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("src", help="weights file, or torchvision:ARCH[.VARIANT]")
  parser.add_argument("out", help="checkpoint directory to write")
  parser.add_argument("--arch", help="zoo architecture (optional for torchvision: sources)")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="new head size; a different size from the source re-initialises the head")
  parser.add_argument("--seed", type=int, default=0, help="seed of a new head")
  parser.add_argument("--force", action="store_true", help="overwrite OUT")
  parser.add_argument("--trust-pickle", action="store_true",
                      help="unpickle SRC with torch.load(weights_only=False) when it holds more than "
                      "tensors; runs code from the file: only for files you made yourself")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

  import jax  # after argument parsing, so --help is instant
  try:
    model = convert.convert_source(args.src, args.arch, args.num_classes, jax.random.key(args.seed),
                                   trust_pickle=args.trust_pickle)
    out = checkpoint.save_model(args.out, model, force=args.force)
  except (convert.ConversionError, checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  src = model.meta["source"]
  print(f"arch {model.meta['arch']}  classes {model.spec.num_classes}  "
        f"params {count_params(model):,}")
  if src.get("new_head"):
    print(f"new {model.spec.num_classes}-class head (source had {src['num_classes']} classes); "
          "the source classifier was dropped")
  print(f"source {src.get('file')}  sha256 {src.get('sha256')}")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
