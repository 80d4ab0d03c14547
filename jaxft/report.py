"""Metrics out of a run: classification metrics, JSONL + TensorBoard writers, PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
  """Returns top-1, top-5, per-class accuracy, mean cross-entropy and the confusion matrix.

  Args:
    logits: ``[N, C]`` scores.
    labels: ``[N]`` integer labels.
    class_names: the ``C`` class names (keys of ``per_class``).

  Returns:
    ``{'n', 'loss', 'top1', 'top5', 'per_class': {name: acc}, 'confusion': [[int]]}`` (rows: true class).
    Inputs are never mutated.
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  n, c = logits.shape
  shifted = logits - logits.max(axis=1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = float(-logp[np.arange(n), labels].mean()) if n else float("nan")
  pred = logits.argmax(axis=1)
  k = min(5, c)
  topk = np.argsort(-logits, axis=1)[:, :k]
  confusion = np.zeros((c, c), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  support = confusion.sum(axis=1)
  per_class = {name: (float(confusion[i, i] / support[i]) if support[i] else float("nan"))
               for i, name in enumerate(class_names)}
  return {
      "n": int(n),
      "loss": loss,
      "top1": float((pred == labels).mean()) if n else float("nan"),
      "top5": float((topk == labels[:, None]).any(axis=1).mean()) if n else float("nan"),
      "per_class": per_class,
      "confusion": confusion.tolist(),
  }


def json_ready(v: Any) -> Any:
  """``v`` as strict JSON takes it: a NaN or infinity (a class without examples has no accuracy; a
  diverged loss) becomes ``None`` (``null``); numpy/jax scalars and arrays become plain numbers and
  lists, tuples lists. Returns a new value; ``v`` is not mutated."""
  if isinstance(v, Mapping):
    return {k: json_ready(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [json_ready(x) for x in v]
  if hasattr(v, "tolist"):  # numpy and jax scalars and arrays
    return json_ready(v.tolist())
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _summary_writer() -> type:
  """Returns ``tensorboardX.SummaryWriter``, imported without importing torch.

  tensorboardX imports torch where it is installed (for type annotations of tensor arguments: 1.3 s and
  ~300 MB per training process); jaxft writes Python floats only. While tensorboardX loads, a ``None``
  entry in ``sys.modules`` makes ``import torch`` fail fast; the entry is removed afterwards, so a later
  ``import torch`` in this process is unaffected. Where torch is already imported, it is used as is.

  Raises:
    ImportError: tensorboardX is not installed.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends scalar metrics to ``metrics.jsonl`` and TensorBoard event files in ``workdir``.

  Lines are flushed on every write, so a crash loses nothing already written. Every line is strict JSON:
  a non-finite number is written as ``null`` (and left out of TensorBoard).
  """

  def __init__(self, workdir: str | os.PathLike[str], enabled: bool = True):
    self.path = Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._tb = None
    if enabled:
      try:
        self._tb = _summary_writer()(str(Path(workdir) / "tensorboard"))
      except ImportError:  # optional: JSONL is always written
        logging.warning("tensorboardX not installed; writing metrics.jsonl only")

  def drop_after(self, step: int) -> int:
    """Removes the records of steps after ``step`` (a resumed run writes them again; exact resume
    recomputes the same values) and a line torn by a crash; returns how many lines went. The file is
    replaced atomically."""
    if not self.enabled or not self.path.exists():
      return 0
    lines = self.path.read_text().splitlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line)
      except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        pass
    if len(keep) < len(lines):
      tmp = self.path.with_name(self.path.name + ".tmp")
      tmp.write_text("".join(line + "\n" for line in keep))
      os.replace(tmp, self.path)
    return len(lines) - len(keep)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    """Writes one record ``{"step", "split", **metrics}``; non-scalar values go to JSONL only."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update(json_ready(dict(metrics)))
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=False) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Returns every record of ``workdir/metrics.jsonl`` (empty list if there is none); a ``null`` value
  (a non-finite number) is ``None``."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


REG_PREFIX = "reg/"  # train records' adaptive weights in effect (jaxft.train.steps.REG_METRIC)


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> dict[str, list[str]]:
  """Saves training curves as a PNG: train/val loss, top-1, the learning rate and, when a run has
  adaptive weights (``reg/<key>`` in its train records), the values in effect, one line each (log
  scale), vs step.

  Returns:
    What was drawn: ``{panel title: [line labels]}``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def series(split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records
           if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]

  reg_keys = sorted({k for r in records if r.get("split") == "train" for k in r
                     if k.startswith(REG_PREFIX)})
  panels = {"loss": [("train", "loss", "-"), ("val", "loss", "o-")],
            "top-1 accuracy": [("train", "top1", "-"), ("val", "top1", "o-")],
            "learning rate": [("train", "lr", "-")]}
  if reg_keys:
    panels["adaptive weights"] = [("train", k, "-") for k in reg_keys]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4))
  drawn: dict[str, list[str]] = {}
  for ax, (title, lines) in zip(axes, panels.items()):
    for split, key, style in lines:
      label = key[len(REG_PREFIX):] if key.startswith(REG_PREFIX) else split
      ax.plot(*series(split, key), style, label=label)
      drawn.setdefault(title, []).append(label)
    ax.set_title(title)
    if len(lines) > 1:
      ax.legend()
    if title == "adaptive weights":
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return drawn


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                   path: str | os.PathLike[str]) -> None:
  """Saves a confusion matrix (rows: true class, columns: predicted) as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cm = np.asarray(confusion)
  c = len(class_names)
  fig, ax = plt.subplots(figsize=(max(5, 0.6 * c + 2), max(4, 0.6 * c + 1)))
  im = ax.imshow(cm, cmap="Blues")
  ax.set_xticks(range(c), class_names, rotation=45, ha="right")
  ax.set_yticks(range(c), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if c <= 20:
    for i in range(c):
      for j in range(c):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
