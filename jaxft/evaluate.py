"""Evaluate a model on labelled images: top-1, top-5 and per-class accuracy.

  python -m jaxft.evaluate --checkpoint runs/cifar10 --data folder:data/cifar10/train --limit 1000

Labels are matched by class *name*: a checkpoint trained by jaxft records its classes
(``meta['class_names']``), and each class folder of the data is scored against the output of that name,
so a folder with a subset of the classes, or with them in another order, is scored correctly; a folder
whose name the checkpoint does not know is an error. A checkpoint without class names (converted
weights) is scored by index — data label ``i`` is output ``i`` — and the output says so
(``"labels": "by index"``).

Preprocessing comes from the checkpoint's meta. A model trained on the streaming pipeline records its
eval transform (``meta['eval_transform']``: resize the shorter side to ``floor(size / crop_pct)``,
centre-crop ``size``, bilinear, ``mean``/``std``; :func:`eval_transform`), and each image is made exactly
as its validation images were (``--image-size`` changes the crop side). Otherwise (older checkpoints,
the in-memory pipeline, converted weights) whole images are normalised with ``mean``/``std`` and resized
to ``input_size`` unless ``--image-size`` says otherwise. The forward pass is jit-compiled once: the last batch is padded
to the batch size. The last line printed is a JSON object with ``top1``, ``top5``, ``loss``, ``n``,
``per_class`` (each class of the data that has images), ``checkpoint_step`` and ``weights`` (which step
and which weights were evaluated), ``ema`` and ``labels``; ``--output preds.npz`` also saves the logits
and labels, ``--confusion cm.png`` the confusion matrix.

Exit status (the contract of jaxft's CLIs): 0 done; 2 bad input (checkpoint, data, flags), one line
``error: …``; 3 the checkpoint gives non-finite logits or loss; 4 a damaged checkpoint. ``--debug``
also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, Sequence

if __name__ == "__main__":
  # The CLI runs under tcmalloc (main's cpu.enable(relaunch=True)): re-exec before this module loads
  # JAX and orbax (~1.7 s), not after, or the relaunched process pays for them twice.
  from jaxft.cpu import allocator  # pylint: disable=g-import-not-at-top  # loads no JAX
  allocator.relaunch_with_tcmalloc()

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import checkpoint as ckpt_lib
from jaxft import cpu, data
from jaxft.models import IMAGENET_MEAN, IMAGENET_STD, Model
from jaxft.report import classification_metrics, plot_confusion
from jaxft.train.errors import EXIT_BAD_INPUT, EXIT_DAMAGED_CHECKPOINT, EXIT_NONFINITE, EXIT_SIGINT

log = logging.getLogger(__name__)

# checkpoint.load_model's name for a save_model directory → evaluate's.
_WEIGHTS_NAMES = {"saved": "model"}
# The exit codes of jaxft's CLIs, one table for training and evaluation (jaxft.train.errors).
EXIT_INTERNAL = 1  # a bug in jaxft: --debug shows where
# Class names listed in full in an error message up to this many; longer lists are cut.
_LISTED_NAMES = 20


class EvalError(ValueError):
  """An evaluation that cannot give a right answer; the message names the problem and the fix.

  ``exit_code`` is what ``python -m jaxft.evaluate`` exits with (``EXIT_BAD_INPUT`` unless the
  checkpoint gave non-finite numbers: ``EXIT_NONFINITE``).
  """

  def __init__(self, message: str = "", *, exit_code: int = EXIT_BAD_INPUT):
    super().__init__(message)
    self.exit_code = exit_code


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
    labels: ``int [N]``: the index of each image's class among the model's outputs.
    batch_size, image_size: see :func:`predict_logits`.
    class_names: names of the model's outputs (keys of ``per_class``); default ``"0"``, ``"1"``, ….

  Returns:
    ``{'top1', 'top5', 'per_class': {name: acc}, 'n', 'loss', 'confusion', 'logits'}``; ``logits`` is
    the ``[N, num_classes]`` array, everything else is plain data (``per_class`` is NaN for a class
    without images).

  Raises:
    ValueError: mismatched ``images``/``labels``, or labels outside the model's classes.
    EvalError: non-finite logits or loss (``exit_code`` ``EXIT_NONFINITE``): the numbers would be wrong.
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
  bad = int((~np.isfinite(logits)).any(axis=1).sum())
  if bad:
    raise EvalError(f"the model gives non-finite logits (NaN or inf) for {bad} of {len(logits)} images: "
                    "its weights are damaged or diverged", exit_code=EXIT_NONFINITE)
  # Finite logits give a finite loss (a float64 log-softmax of float32 values), so this is the one check.
  result = classification_metrics(logits, labels, names)
  result["logits"] = logits
  return result


# ---------------------------------------------------------------------------------------------------------
# Which checkpoint, which classes.


def model_class_names(model: Model) -> tuple[str, ...] | None:
  """The names of ``model``'s outputs as training recorded them (``meta['class_names']``), or ``None``
  when it records none (converted weights). ``model`` is not mutated.

  Raises:
    EvalError: recorded names that are not one distinct string per output of the head.
  """
  names = model.meta.get("class_names")
  if names is None:
    return None
  nc = model.spec.num_classes
  if (not isinstance(names, (list, tuple)) or len(names) != nc or len(set(names)) != nc
      or not all(isinstance(n, str) for n in names)):
    raise EvalError(f"the checkpoint's meta['class_names'] must be {nc} distinct names, one per output "
                    f"of its head; got {str(names)[:200]}")
  return tuple(names)


def _listing(names: Sequence[str]) -> str:
  shown = str(list(names[:_LISTED_NAMES]))
  return shown if len(names) <= _LISTED_NAMES else f"{shown[:-1]}, … ({len(names)} in all)]"


def label_table(data_names: Sequence[str], model_names: Sequence[str] | None,
                num_classes: int) -> np.ndarray:
  """``table[i]``: the model output that images of data class ``i`` are scored against.

  By name when ``model_names`` is given (so the data may hold any subset of the classes, in any
  order), else by index (``table[i] = i``). Nothing is mutated.

  Raises:
    EvalError: a data class the model does not know (naming it and listing the known ones); by index,
      more data classes than the model has outputs.
  """
  if model_names is None:
    if len(data_names) > num_classes:
      raise EvalError(f"the data has {len(data_names)} classes but the checkpoint's head has "
                      f"{num_classes} outputs and records no class names, so labels can only be matched "
                      f"by index; evaluate on at most {num_classes} class folders, or on a checkpoint "
                      "trained by jaxft (it records its class names)")
    return np.arange(len(data_names))
  index = {n: i for i, n in enumerate(model_names)}
  unknown = [n for n in data_names if n not in index]
  if unknown:
    raise EvalError(f"class folder(s) {unknown} are not classes of the checkpoint, which knows "
                    f"{_listing(model_names)}; rename or remove those folders")
  return np.asarray([index[n] for n in data_names], np.int64)


def checkpoint_choice(path: str | os.PathLike, *, ema: bool = False) -> tuple[Path, int | None, str]:
  """Which checkpoint directory :func:`jaxft.checkpoint.load_model` reads for ``path``, and what it is.

  Returns:
    ``(directory, step, weights)``: ``weights`` is ``'best'`` or ``'latest'`` for a training workdir
    (the step :func:`jaxft.checkpoint.best_step` picks), ``'step'`` for a step directory named directly,
    ``'model'`` for a model directory (written by ``save_model``; its ``step`` is ``None``).

  Raises:
    FileNotFoundError, jaxft.checkpoint.CheckpointError: see :func:`jaxft.checkpoint.find_checkpoint`.
    EvalError: ``ema`` and the checkpoint holds no EMA weights.
  """
  p = Path(path).absolute()
  found = ckpt_lib.find_checkpoint(p)
  digits = found.name.rsplit("_", 1)[-1]
  if found != p:  # a workdir or its checkpoints/ directory: find_checkpoint chose a step
    _, why = ckpt_lib.best_step(found.parent)
    step, weights = int(digits), "best" if why.startswith("best") else "latest"
  elif digits.isdigit() and (found / ckpt_lib.TRAIN_ITEM).is_dir():
    step, weights = int(digits), "step"
  else:
    step, weights = None, "model"
  if ema and not (found / ckpt_lib.EMA_ITEM).is_dir():
    why_none = ("a model directory has none" if weights == "model"
                else "the run was trained with config.ema.decay = 0")
    raise EvalError(f"{found} holds no EMA weights ({why_none}); drop --ema (ema=True)")
  return found, step, weights


def load_for_eval(path: str | os.PathLike, *, ema: bool = False) -> tuple[Model, dict[str, Any]]:
  """Loads the model to evaluate from ``path`` (its EMA weights with ``ema``).

  Returns:
    ``(model, info)``; ``info`` is ``{'checkpoint_step', 'weights', 'ema'}`` (see
    :func:`checkpoint_choice`; the loader's own ``meta['checkpoint_step']``/``meta['weights']`` win,
    since it knows when it fell back from a damaged step).

  Raises:
    FileNotFoundError (no ``path``), jaxft.checkpoint.CheckpointError, EvalError (``exit_code``
    ``EXIT_DAMAGED_CHECKPOINT``: a checkpoint whose files cannot be read).
  """
  found, step, weights = checkpoint_choice(path, ema=ema)
  loader = ckpt_lib.load_ema_model if ema else ckpt_lib.load_model
  try:
    model = loader(path)
  except ckpt_lib.CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 — orbax and tensorstore raise many kinds on damaged files
    # (a FileNotFoundError here is a file missing inside the checkpoint: checkpoint_choice found it)
    # Orbax wraps TensorStore's error (which names the leaf and the file) in one that dumps a whole
    # TensorStore spec: report the inner one, cut before any such dump.
    inner = e.__cause__ or e
    cause = " ".join(str(inner).split()).split(" See full TensorStore details")[0][:300]
    raise EvalError(f"{found} cannot be read, the checkpoint is damaged: {type(inner).__name__}: {cause}",
                    exit_code=EXIT_DAMAGED_CHECKPOINT) from e
  info = {"checkpoint_step": model.meta.get("checkpoint_step", step),
          # checkpoint.load_model calls a save_model directory "saved"; evaluate's word for it is "model".
          "weights": _WEIGHTS_NAMES.get(model.meta.get("weights", weights), model.meta.get("weights", weights)),
          "ema": ema}
  return model, info


def describe_weights(info: dict[str, Any]) -> str:
  """``info`` of :func:`load_for_eval` in words: ``step 40 (best)``, ``step 8``, ``model weights``…"""
  step, weights = info["checkpoint_step"], info["weights"]
  if step is None:
    out = f"{weights} weights"
  else:
    out = f"step {step}" + ("" if weights == "step" else f" ({weights})")
  return out + (", EMA weights" if info["ema"] else "")


# ---------------------------------------------------------------------------------------------------------
# A checkpoint on a data source: what the CLI does.


# The one eval transform a checkpoint may record (jaxft.train.setup.eval_transform_record).
EVAL_RESIZE = "shorter_side_center_crop"
EVAL_INTERPOLATIONS = ("bilinear",)  # what jaxft.data.host_transforms resamples with


def eval_transform(model: Model) -> dict[str, Any] | None:
  """``model``'s recorded eval transform (``meta['eval_transform']``, checked), or ``None`` when it
  records none (then whole images are resized, as before the record existed). Nothing is mutated.

  Returns:
    ``{'resize', 'size', 'crop_pct', 'interpolation', 'mean', 'std'}`` (a new dict).

  Raises:
    EvalError: a record this jaxft cannot apply (naming the field and what it accepts).
  """
  record = model.meta.get("eval_transform")
  if record is None:
    return None
  where = "the checkpoint's meta['eval_transform']"
  if not isinstance(record, dict):
    raise EvalError(f"{where} must be a dict, got {str(record)[:100]}; retrain, or delete the record "
                    "to resize whole images")
  problems = []
  if record.get("resize") != EVAL_RESIZE:
    problems.append(f"resize = {record.get('resize')!r} (this jaxft knows {EVAL_RESIZE!r})")
  size, crop_pct = record.get("size"), record.get("crop_pct")
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    problems.append(f"size = {size!r} (a positive int)")
  if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
    problems.append(f"crop_pct = {crop_pct!r} (in (0, 1])")
  if record.get("interpolation") not in EVAL_INTERPOLATIONS:
    problems.append(f"interpolation = {record.get('interpolation')!r} (one of {list(EVAL_INTERPOLATIONS)})")
  for key in ("mean", "std"):
    v = record.get(key)
    if (not isinstance(v, (list, tuple)) or len(v) != 3
        or not all(isinstance(x, (int, float)) for x in v) or (key == "std" and min(v) <= 0)):
      problems.append(f"{key} = {str(v)[:60]} (three numbers{', all > 0' if key == 'std' else ''})")
  if problems:
    raise EvalError(f"{where} cannot be applied: {'; '.join(problems)}; evaluate with the jaxft that "
                    "trained it, or retrain")
  return {**record, "crop_pct": float(crop_pct), "mean": list(record["mean"]), "std": list(record["std"])}


def _load_transformed(source: str, split: str, limit: int | None, transform: dict[str, Any],
                      image_size: int | None) -> data.Dataset:
  """Every image of ``source`` through the recorded eval transform (at ``image_size`` when given), as
  the training run made its validation images (:func:`jaxft.data.stream.eval_arrays`)."""
  from jaxft.data import stream  # pylint: disable=g-import-not-at-top  (grain: only for such checkpoints)
  src = stream.open_source(source, split, limit=limit, cache_dir=None)
  if not len(src):
    raise EvalError(f"data source {source!r} (split {split!r}) holds no images")
  options = stream.StreamOptions(size=int(image_size or transform["size"]), train=False,
                                 crop_pct=transform["crop_pct"])
  return stream.eval_arrays(src, options)


def _load_data(source: str, split: str, limit: int | None, target: int | None) -> data.Dataset:
  try:
    ds = data.load_source(source, split=split, limit=limit)
  except data.DataError as e:
    if "differ in size" not in str(e) or not target:
      raise
    # Mixed-size folders must be resized while decoding.
    ds = data.load_source(source, split=split, limit=limit, image_size=target)
  if not len(ds):
    raise EvalError(f"data source {source!r} (split {split!r}) holds no images")
  return ds


def _write_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: Path) -> None:
  # Only the classes that occur (as the truth or as a prediction): a 1000-class head scored on a few
  # folders stays readable, and no count is left out.
  cm = np.asarray(confusion)
  used = np.flatnonzero(cm.sum(axis=0) + cm.sum(axis=1))
  path.parent.mkdir(parents=True, exist_ok=True)
  plot_confusion(cm[np.ix_(used, used)], [names[i] for i in used], path)


def evaluate_checkpoint(checkpoint: str | os.PathLike, source: str, *, limit: int | None = None,
                        batch_size: int = 256, image_size: int | None = None,
                        output: str | os.PathLike | None = None, split: str = "train", ema: bool = False,
                        confusion: str | os.PathLike | None = None) -> dict[str, Any]:
  """What ``python -m jaxft.evaluate`` does: load, evaluate, optionally save logits and the confusion
  matrix. Nothing is written unless the evaluation succeeded; the data and checkpoint are only read.

  Args:
    checkpoint: a checkpoint or training workdir (see :func:`jaxft.checkpoint.load_model`).
    source: a data source (``folder:PATH``, …; see :func:`jaxft.data.load_source`). Its classes are
      matched to the checkpoint's by name (see the module docstring).
    limit: evaluate on this many images, spread round-robin over the classes.
    batch_size, image_size: see :func:`predict_logits`; with a recorded eval transform
      (:func:`eval_transform`) ``image_size`` is the centre-crop side instead (default: the record's).
    output: an ``.npz`` path for ``logits``, ``labels`` (indices of the logits' columns) and
      ``class_names`` (the names of those columns).
    split: the split of ``source``.
    ema: evaluate the run's EMA weights.
    confusion: a ``.png`` path for the confusion matrix.

  Returns:
    The JSON-ready summary ``{'top1', 'top5', 'loss', 'n', 'per_class', 'checkpoint', 'checkpoint_step',
    'weights', 'ema', 'labels', 'data'}``; every number is finite.

  Raises:
    FileNotFoundError, jaxft.checkpoint.CheckpointError, jaxft.data.DataError, EvalError (its
    ``exit_code`` says which kind), ValueError.
  """
  model, info = load_for_eval(checkpoint, ema=ema)
  model_names = model_class_names(model)
  transform = eval_transform(model)
  if transform is None:  # whole images, resized (older checkpoints, the in-memory pipeline)
    ds = _load_data(source, split, limit, image_size or model.meta.get("input_size"))
  else:  # the crops the run validated on; the network sees them as they are
    ds = _load_transformed(source, split, limit, transform, image_size)
    image_size = ds.images.shape[1]
    model = model.replace(meta={**model.meta, "mean": transform["mean"], "std": transform["std"]})
  nc = model.spec.num_classes
  table = label_table(ds.class_names, model_names, nc)
  if model_names is None:
    log.warning("%s records no class names: class folder i is scored as output i (by index)", checkpoint)
  known = list(model_names or ds.class_names)
  names = known + [f"#{i}" for i in range(len(known), nc)]  # by index: outputs no data class names
  labels = table[ds.labels]
  try:
    result = evaluate(model, ds.images, labels, batch_size=batch_size, image_size=image_size,
                      class_names=names)
  except EvalError as e:
    raise EvalError(f"{checkpoint} ({describe_weights(info)}): {e}; evaluate another step, or retrain",
                    exit_code=e.exit_code) from None
  if output is not None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    np.savez(output, logits=result["logits"], labels=labels, class_names=np.asarray(names))
  if confusion is not None:
    _write_confusion(result["confusion"], names, Path(confusion))
  # Each data class that has images, under its own name (a class folder without images has no accuracy).
  cm = np.asarray(result["confusion"])
  per_class = {ds.class_names[i]: float(cm[j, j] / cm[j].sum()) for i, j in enumerate(table) if cm[j].sum()}
  summary = {k: result[k] for k in ("top1", "top5", "loss", "n")}
  summary.update(per_class=per_class, checkpoint=str(checkpoint), **info,
                 labels="by index" if model_names is None else "by name", data=source)
  return summary


# ---------------------------------------------------------------------------------------------------------
# The command line.


class _Parser(argparse.ArgumentParser):
  """Usage errors as one ``error: …`` line and exit status 2, as every other bad input."""

  def error(self, message: str) -> NoReturn:
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _Parser(prog="python -m jaxft.evaluate", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory or training workdir")
  parser.add_argument("--data", required=True, help="data source, e.g. folder:PATH")
  parser.add_argument("--split", default="train", help="split of the source (default: train)")
  parser.add_argument("--limit", type=int, default=None, help="evaluate on N images, spread over classes")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--image-size", type=int, default=None,
                      help="network input size (default: the checkpoint's input_size; with a recorded "
                      "eval transform, the centre-crop side)")
  parser.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights")
  parser.add_argument("--output", default=None, help="write logits and labels to this .npz")
  parser.add_argument("--confusion", default=None, help="write the confusion matrix to this .png")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  args = parser.parse_args(argv)
  for flag in ("limit", "batch_size", "image_size"):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      parser.error(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
  if args.confusion is not None and Path(args.confusion).suffix.lower() != ".png":
    parser.error(f"--confusion writes a PNG image: give a path ending in .png, got {args.confusion!r}")
  return args


def _exit_code(e: BaseException) -> int:
  code = getattr(e, "exit_code", None)
  if isinstance(code, int):
    return code
  if isinstance(e, KeyboardInterrupt):
    return EXIT_SIGINT
  # CheckpointError and DataError are ValueErrors; OSError: a path that cannot be read or written.
  return EXIT_BAD_INPUT if isinstance(e, (ValueError, OSError)) else EXIT_INTERNAL


def _message(e: BaseException) -> str:
  text = " ".join(str(e).split("\n")).strip()
  if isinstance(e, KeyboardInterrupt):
    return "interrupted; nothing was written"
  if _exit_code(e) == EXIT_INTERNAL:
    return f"internal error, {type(e).__name__}: {text} (please report it; --debug shows the traceback)"
  return text or type(e).__name__


def _quiet_leftovers() -> None:
  # A failed orbax read leaves coroutines and futures holding the error already reported; Python
  # prints their tracebacks when it collects them (often at exit, after the error line).
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: parses flags, calls :func:`evaluate_checkpoint`; returns the exit status (0 done;
  2 bad input; 3 non-finite logits or loss; 4 a damaged checkpoint; 130 interrupted), printing one
  ``error: …`` line for any failure (and its traceback with ``--debug``)."""
  args = _parse(argv)
  if not args.debug:
    _quiet_leftovers()
  try:
    cpu.enable(relaunch=True)  # before any JAX computation (it may re-exec this process)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = evaluate_checkpoint(args.checkpoint, args.data, limit=args.limit,
                                  batch_size=args.batch_size, image_size=args.image_size,
                                  output=args.output, split=args.split, ema=args.ema,
                                  confusion=args.confusion)
    line = json.dumps(summary, allow_nan=False)  # strict JSON: a NaN here is a bug, never printed
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 — the one boundary: every failure one line
    if args.debug:
      traceback.print_exc()
    print(f"error: {_message(e)}", file=sys.stderr)
    return _exit_code(e)
  print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  loss {summary['loss']:.4f}  on "
        f"{summary['n']} images; {describe_weights(summary)}; labels {summary['labels']}", file=sys.stderr)
  print(line, flush=True)  # last line: machine-readable
  return 0


if __name__ == "__main__":
  sys.exit(main())
