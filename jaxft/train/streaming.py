"""The run's data on the streaming pipeline (``config.data.pipeline = 'stream'``, :mod:`jaxft.data.stream`):
the training source (files or arrays, never all decoded), the validation set decoded once through the
eval transform, and the iterator of training batches from any step.

Kept apart from :mod:`jaxft.train.setup` so that grain is imported only by runs that stream.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from jaxft import data as data_lib
from jaxft.data import stream
from jaxft.train.errors import TrainError

Config = ml_collections.ConfigDict


def options(config: Config, train: bool) -> stream.StreamOptions:
  """The host transform of the train (``train``) or validation examples, from ``config.data``."""
  dc = config.data
  return stream.StreamOptions(size=dc.image_size, train=train, scale=tuple(dc.scale),
                              ratio=tuple(dc.ratio), flip=dc.flip, crop_pct=dc.crop_pct,
                              augment=dc.augment, num_ops=dc.randaugment_ops,
                              magnitude=dc.randaugment_magnitude, color_jitter=dc.color_jitter)


def load_stream_data(config: Config) -> tuple[stream.Source, data_lib.Dataset | None]:
  """Returns ``(train source, val)``: the training examples as a stream source, and the validation
  examples through the eval transform as an in-memory :class:`~jaxft.data.Dataset` (None when
  ``data.val_fraction`` is 0 and there is no ``data.val_source``). ``config`` is not mutated.

  Raises:
    TrainError: bad data (the :class:`~jaxft.data.DataError` message): unreadable files without
      ``data.skip_corrupt``, an empty class folder, a single class, grain missing.
  """
  dc = config.data
  common = dict(skip_corrupt=dc.skip_corrupt, num_workers=dc.workers, cache_dir=dc.cache_dir or None)
  try:
    train = stream.open_source(dc.source, "train", limit=dc.limit or None, **common)
    stream.check_classes(train.class_names, dc.source)
    if dc.val_source:
      val_src = stream.open_source(dc.val_source, dc.val_split, **common)
    elif dc.val_fraction > 0:
      train, val_src = data_lib.split_train_val(train, dc.val_fraction, dc.split_seed)
    else:
      val_src = None
    val = None if val_src is None else stream.eval_arrays(val_src, options(config, train=False))
  except data_lib.DataError as e:
    raise TrainError(str(e)) from None
  logging.info("train (streamed): %d images, %d classes, %d skipped", len(train), train.num_classes,
               len(getattr(train, "skipped", ())))
  if val is not None:
    logging.info("val: %s", data_lib.describe(val))
  return train, val


def train_batches(config: Config, train: stream.Source, start_step: int, num_steps: int) -> Any:
  """A :class:`~jaxft.data.stream.StreamIterator` over steps ``start_step …`` of ``train``: what
  :func:`jaxft.data.iterate` yields, with the same examples at every step.

  Each process builds the whole global batch, as the in-memory pipeline does, because
  ``DataMesh.shard`` takes global batches and keeps this process's rows; building only this host's
  rows (``train_dataset(process_index=…)``) needs a shard that takes local ones.
  """
  try:
    ds = stream.train_dataset(train, options(config, train=True), batch_size=config.train.batch_size,
                              seed=config.seed, process_index=0, process_count=1)
  except data_lib.DataError as e:
    raise TrainError(str(e)) from None
  return stream.StreamIterator(ds, start_step, num_steps, num_workers=config.data.workers)
