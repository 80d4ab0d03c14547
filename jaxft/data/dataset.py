"""The in-memory dataset every source produces: decoded ``uint8`` images, ``int32`` labels, class names."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


class DataError(ValueError):
  """A data source that cannot be loaded as asked; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Decoded images and integer labels held in host memory.

  Attributes:
    images: ``uint8 [N, H, W, 3]``.
    labels: ``int32 [N]``, each in ``[0, len(class_names))``.
    class_names: label ``i`` is ``class_names[i]``.
    skipped: how many unreadable files were skipped while loading (``skip_corrupt=True``).
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  skipped: int = 0

  def __post_init__(self) -> None:
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise DataError(f"Dataset.images must be uint8 [N, H, W, 3], got {self.images.dtype} "
                      f"{list(self.images.shape)}")
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise DataError(f"Dataset.labels must be int32 [{self.images.shape[0]}], got "
                      f"{self.labels.dtype} {list(self.labels.shape)}")
    if len(self.labels) and not (0 <= self.labels.min() and self.labels.max() < len(self.class_names)):
      raise DataError(f"labels must lie in [0, {len(self.class_names)}), got "
                      f"[{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_classes(self) -> int:
    """``len(class_names)``."""
    return len(self.class_names)

  def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
    """Returns a new dataset of the examples at ``indices`` (in that order); ``self`` is not mutated and
    the returned arrays are copies. ``skipped`` carries over (it describes the load)."""
    idx = np.asarray(indices, dtype=np.int64)
    return Dataset(self.images[idx], self.labels[idx], self.class_names, self.skipped)


def describe(ds: Dataset) -> str:
  """A one-line summary: size, classes, image shape, per-class count range, skipped files."""
  counts = np.bincount(ds.labels, minlength=ds.num_classes)
  names = ", ".join(ds.class_names[:5]) + (", …" if ds.num_classes > 5 else "")
  shape = "x".join(map(str, ds.images.shape[1:]))
  per = f"{counts.min()}-{counts.max()} per class" if len(counts) else "no classes"
  skipped = f", {ds.skipped} skipped" if ds.skipped else ""
  return f"{len(ds)} images {shape}, {ds.num_classes} classes ({names}), {per}{skipped}"
