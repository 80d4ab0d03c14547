"""Data: sources decoded once into ``uint8`` arrays, a disk cache, deterministic batching and on-device
image transforms. The names below are re-exported from the submodules, imported on first use (PEP 562):

* :mod:`~jaxft.data.dataset` — :class:`Dataset`, :class:`DataError`, :func:`describe`.
* :mod:`~jaxft.data.sources` — :func:`load_source` (``folder:``, ``cifar:``, ``tfds:``, ``sklearn:``).
* :mod:`~jaxft.data.decode` — pillow decoding, in worker processes for long listings.
* :mod:`~jaxft.data.cache` — the on-disk ``.npz`` cache of decoded datasets.
* :mod:`~jaxft.data.pipeline` — validation split, batch indices as a function of ``(seed, step)``,
  background prefetch.
* :mod:`~jaxft.data.transforms` — crop, flip, resize, normalise, mixup, cutmix, random erasing.

See docs/data.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "Dataset": "dataset", "DataError": "dataset", "describe": "dataset",
    "load_source": "sources", "SCHEMES": "sources", "NAMED_SCHEMES": "sources",
    "IMAGE_EXTENSIONS": "sources", "SPLIT_NAMES": "sources", "SKLEARN_DATASETS": "sources",
    "default_cache_dir": "cache",
    "split_train_val": "pipeline", "epoch_permutation": "pipeline", "steps_per_epoch": "pipeline",
    "batch_indices": "pipeline", "Batch": "pipeline", "Prefetcher": "pipeline", "iterate": "pipeline",
    "normalize": "transforms", "augment": "transforms", "preprocess_eval": "transforms",
}
_SUBMODULES = ("cache", "dataset", "decode", "pipeline", "sources", "transforms")

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from jaxft.data.cache import default_cache_dir
  from jaxft.data.dataset import DataError, Dataset, describe
  from jaxft.data.pipeline import (Batch, Prefetcher, batch_indices, epoch_permutation, iterate,
                                   split_train_val, steps_per_epoch)
  from jaxft.data.sources import (IMAGE_EXTENSIONS, NAMED_SCHEMES, SCHEMES, SKLEARN_DATASETS, SPLIT_NAMES,
                                  load_source)
  from jaxft.data.transforms import augment, normalize, preprocess_eval


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"jaxft.data.{_EXPORTS[name]}"), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"jaxft.data.{name}")
  else:
    raise AttributeError(f"module 'jaxft.data' has no attribute {name!r}")
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
