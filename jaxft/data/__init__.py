"""Data: sources decoded once into ``uint8`` arrays, a disk cache, deterministic batching and on-device
image transforms. The names below are re-exported from the submodules, imported on first use (PEP 562):

* :mod:`~jaxft.data.dataset` — :class:`Dataset`, :class:`DataError`, :func:`describe`.
* :mod:`~jaxft.data.sources` — :func:`load_source` (``folder:``, ``cifar:``, ``tfds:``, ``sklearn:``).
* :mod:`~jaxft.data.decode` — pillow decoding, in worker processes for long listings.
* :mod:`~jaxft.data.cache` — the on-disk ``.npz`` cache of decoded datasets.
* :mod:`~jaxft.data.pipeline` — validation split, batch indices as a function of ``(seed, step)``,
  background prefetch.
* :mod:`~jaxft.data.transforms` — crop, flip, resize, normalise, mixup, cutmix, random erasing.
* :mod:`~jaxft.data.stream` — the streaming pipeline on grain (imported only when used: grain loads JAX).
* :mod:`~jaxft.data.host_transforms` — random-resized crop, flip, resize-shorter + centre crop, per image.
* :mod:`~jaxft.data.decoded` — the ``auto`` pipeline's fast path: a folder held decoded, the same batches.
* :mod:`~jaxft.data.records` — ``arrayrecord:`` and ``tfds:`` random-access sources for the stream.

See docs/data.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxft import _lazy

# submodule → the public names it defines
_NAMES = {
    "dataset": ("Dataset", "DataError", "describe"),
    "sources": ("load_source", "SCHEMES", "NAMED_SCHEMES", "IMAGE_EXTENSIONS", "SPLIT_NAMES",
                "SKLEARN_DATASETS"),
    "cache": ("default_cache_dir",),
    "pipeline": ("split_train_val", "take_per_class", "epoch_permutation", "steps_per_epoch", "batch_indices", "Batch",
                 "Prefetcher", "iterate"),
    "transforms": ("normalize", "augment", "preprocess_eval"),
}
_SUBMODULES = ("cache", "dataset", "decode", "decoded", "host_augment", "host_transforms", "pipeline",
               "records", "sources", "stream", "transforms")

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__, {name: '.' + module for module, names in _NAMES.items() for name in names}, _SUBMODULES)

if TYPE_CHECKING:
  from jaxft.data.cache import default_cache_dir
  from jaxft.data.dataset import DataError, Dataset, describe
  from jaxft.data.pipeline import (Batch, Prefetcher, batch_indices, epoch_permutation, iterate,
                                   split_train_val, steps_per_epoch, take_per_class)
  from jaxft.data.sources import (IMAGE_EXTENSIONS, NAMED_SCHEMES, SCHEMES, SKLEARN_DATASETS, SPLIT_NAMES,
                                  load_source)
  from jaxft.data.transforms import augment, normalize, preprocess_eval
