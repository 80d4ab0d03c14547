"""Evaluate a model on labelled images: top-1, top-5 and per-class accuracy.

  python -m jaxft.evaluate --checkpoint out/resnet56 --data folder:data/cifar10/train --limit 1000

Preprocessing comes from the checkpoint's meta (``mean``/``std``; images are resized to ``input_size``
unless ``--image-size`` says otherwise). The forward pass is jit-compiled once: the last batch is padded
to the batch size. The last line printed is a JSON object with ``top1``, ``top5``, ``per_class`` and
``n``; ``--output preds.npz`` also saves the logits and labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import cpu, data
from jaxft.checkpoint import load_model
from jaxft.models import IMAGENET_MEAN, IMAGENET_STD, Model
from jaxft.report import classification_metrics

log = logging.getLogger(__name__)


def predict_logits(model: Model, images: np.ndarray, *, batch_size: int = 256,
                   image_size: int | None = None) -> np.ndarray:
  """Eval-mode logits of ``model`` on raw images.

  Args:
    model: the model; its ``meta`` supplies ``mean``/``std`` (default: ImageNet) and ``input_size``.
    images: ``uint8 [N, H, W, 3]``; never mutated.
    batch_size: examples per forward pass; the last batch is padded so that only one compile happens.
    image_size: side length fed to the network; ``None`` means ``meta['input_size']`` (or the images' own
      size when the meta has none). Images of another size are resized bilinearly.

  Returns:
    ``float32 [N, num_classes]`` logits.

  Raises:
    ValueError: for images that are not ``[N, H, W, 3]`` or a non-positive ``batch_size``.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, H, W, 3], got shape {list(images.shape)}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(images)
  if n == 0:
    return np.zeros((0, model.spec.num_classes), np.float32)
  mean = tuple(model.meta.get("mean", IMAGENET_MEAN))
  std = tuple(model.meta.get("std", IMAGENET_STD))
  size = image_size or model.meta.get("input_size") or images.shape[1]
  module = model.module(layers=cpu.network_layers())

  @jax.jit
  def forward(variables: Any, batch: jax.Array) -> jax.Array:
    return module.apply(variables, data.preprocess_eval(batch, mean, std, out_size=size))

  bs = min(batch_size, n)  # no point compiling for a batch larger than the data
  variables = jax.tree.map(jnp.asarray, model.variables)
  out = []
  for start in range(0, n, bs):
    batch = images[start:start + bs]
    real = len(batch)
    if real < bs:
      batch = np.concatenate([batch, np.zeros((bs - real, *batch.shape[1:]), batch.dtype)])
    out.append(np.asarray(forward(variables, batch))[:real])
  return np.concatenate(out).astype(np.float32)


def evaluate(model: Model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
             image_size: int | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Accuracy of ``model`` on labelled raw images.

  Args:
    model: the model (see :func:`predict_logits` for preprocessing).
    images: ``uint8 [N, H, W, 3]``; never mutated.
    labels: ``int [N]``.
    batch_size, image_size: see :func:`predict_logits`.
    class_names: names of the classes (keys of ``per_class``); default ``"0"``, ``"1"``, ….

  Returns:
    ``{'top1', 'top5', 'per_class': {name: acc}, 'n', 'loss', 'confusion', 'logits'}``; ``logits`` is
    the ``[N, num_classes]`` array, everything else is plain JSON-ready data.

  Raises:
    ValueError: mismatched ``images``/``labels``, or labels outside the model's classes.
  """
  labels = np.asarray(labels)
  if labels.shape != (len(images),):
    raise ValueError(f"labels must have shape [{len(images)}], got {list(labels.shape)}")
  nc = model.spec.num_classes
  if len(labels) and (labels.min() < 0 or labels.max() >= nc):
    raise ValueError(f"labels must lie in [0, {nc}) for a {nc}-class model, got "
                     f"[{labels.min()}, {labels.max()}]")
  names = list(class_names) if class_names is not None else [str(i) for i in range(nc)]
  if len(names) != nc:
    raise ValueError(f"{len(names)} class names for a {nc}-class model")
  logits = predict_logits(model, images, batch_size=batch_size, image_size=image_size)
  result = classification_metrics(logits, labels, names)
  result["logits"] = logits
  return result


def _json_ready(v: Any) -> Any:
  # Strict JSON has no NaN (a class without examples has no accuracy): write null instead.
  if isinstance(v, float) and math.isnan(v):
    return None
  if isinstance(v, dict):
    return {k: _json_ready(x) for k, x in v.items()}
  return v


def evaluate_checkpoint(checkpoint: str | os.PathLike, source: str, *, limit: int | None = None,
                        batch_size: int = 256, image_size: int | None = None,
                        output: str | os.PathLike | None = None, split: str = "train") -> dict[str, Any]:
  """What ``python -m jaxft.evaluate`` does: load, evaluate, optionally save logits.

  Args:
    checkpoint: a checkpoint or training workdir (see :func:`jaxft.checkpoint.load_model`).
    source: a data source (``folder:PATH``, …; see :func:`jaxft.data.load_source`).
    limit: evaluate on this many images, spread round-robin over the classes.
    batch_size, image_size: see :func:`predict_logits`.
    output: an ``.npz`` path for ``logits``, ``labels`` and ``class_names``.
    split: the split of ``source``.

  Returns:
    The JSON-ready summary ``{'top1', 'top5', 'per_class', 'n', 'loss', 'checkpoint', 'data'}``.

  Raises:
    FileNotFoundError, jaxft.checkpoint.CheckpointError, jaxft.data.DataError, ValueError.
  """
  model = load_model(checkpoint)
  target = image_size or model.meta.get("input_size")
  try:
    ds = data.load_source(source, split=split, limit=limit)
  except data.DataError as e:
    if "differ in size" not in str(e) or not target:
      raise
    # Mixed-size folders must be resized while decoding.
    ds = data.load_source(source, split=split, limit=limit, image_size=target)
  if model.spec.num_classes != len(ds.class_names):
    log.warning("the model has %d classes, the data %d", model.spec.num_classes, len(ds.class_names))
  names = list(ds.class_names)[:model.spec.num_classes]
  names += [str(i) for i in range(len(names), model.spec.num_classes)]
  result = evaluate(model, ds.images, ds.labels, batch_size=batch_size, image_size=image_size,
                    class_names=names)
  if output is not None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    np.savez(output, logits=result["logits"], labels=ds.labels, class_names=np.asarray(ds.class_names))
  summary = {k: result[k] for k in ("top1", "top5", "per_class", "n", "loss")}
  summary.update(checkpoint=str(checkpoint), data=source)
  return _json_ready(summary)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: parses flags, calls :func:`evaluate_checkpoint`; returns the exit status."""
  cpu.enable(relaunch=True)  # before any JAX computation (it may re-exec this process)
  parser = argparse.ArgumentParser(prog="python -m jaxft.evaluate", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory or training workdir")
  parser.add_argument("--data", required=True, help="data source, e.g. folder:PATH")
  parser.add_argument("--split", default="train", help="split of the source (default: train)")
  parser.add_argument("--limit", type=int, default=None, help="evaluate on N images, spread over classes")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--image-size", type=int, default=None,
                      help="network input size (default: the checkpoint's input_size)")
  parser.add_argument("--output", default=None, help="write logits and labels to this .npz")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    summary = evaluate_checkpoint(args.checkpoint, args.data, limit=args.limit,
                                  batch_size=args.batch_size, image_size=args.image_size,
                                  output=args.output, split=args.split)
  except (FileNotFoundError, ValueError) as e:  # CheckpointError and DataError are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  on {summary['n']} images",
        file=sys.stderr)
  print(json.dumps(summary), flush=True)  # last line: machine-readable
  return 0


if __name__ == "__main__":
  sys.exit(main())
