"""The run's data on the streaming pipeline (``config.data.pipeline = 'stream'`` or ``'auto'``,
:mod:`jaxft.data.stream`): the training source (files, or with ``auto`` a folder held decoded when it
fits ``data.memory_mb``), the validation set through the eval transform (streamed, or held), and the
iterator of this host's part of the training batches from any step.

Kept apart from :mod:`jaxft.train.setup` so that grain is imported only by runs that stream.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from jaxft import data as data_lib
from jaxft.data import decoded, stream
from jaxft.train.errors import TrainError

Config = ml_collections.ConfigDict


def options(config: Config, train: bool) -> stream.StreamOptions:
  """The host transform of the train (``train``) or validation examples, from ``config.data``."""
  dc = config.data
  return stream.StreamOptions(size=dc.image_size, train=train, scale=tuple(dc.scale),
                              ratio=tuple(dc.ratio), flip=dc.flip, crop_pct=dc.crop_pct,
                              augment=dc.augment, num_ops=dc.randaugment_ops,
                              magnitude=dc.randaugment_magnitude, color_jitter=dc.color_jitter)


def _hold_train(config: Config, train: stream.Source, budget: int) -> tuple[stream.Source, int]:
  """``data.pipeline = 'auto'``: a folder's images decoded once (:mod:`jaxft.data.decoded`) (into the
  cache directory) when their pixels fit ``budget`` bytes, else the files. Returns the source and
  the bytes it holds. The batches are the same either way."""
  dc = config.data
  if dc.pipeline != "auto" or not isinstance(train, stream.FileSource):
    return train, 0
  need = decoded.decoded_bytes(train.sizes, dc.image_size)
  if need > budget:
    logging.info("data.pipeline=auto: streaming the %d training files (decoded they would hold %.0f MiB"
                 ", over data.memory_mb = %d)", len(train), need / 2**20, dc.memory_mb)
    return train, 0
  logging.info("data.pipeline=auto: holding the %d training images decoded (%.0f MiB of "
               "data.memory_mb = %d)", len(train), need / 2**20, dc.memory_mb)
  held = decoded.decode_source(train, dc.image_size, cache_dir=dc.cache_dir or None,
                               num_workers=dc.workers)
  return held, need


def _eval_set(config: Config, val_src: stream.Source, budget: int) -> stream.EvalSet:
  """The validation examples through the eval transform: decoded once and held when ``data.pipeline =
  'auto'`` and the crops fit ``budget`` bytes, else streamed at every evaluation."""
  dc = config.data
  opts = options(config, train=False)
  need = len(val_src) * dc.image_size ** 2 * 3
  if dc.pipeline == "auto" and need <= budget:
    return stream.EvalSet(val_src, opts, held=stream.eval_arrays(val_src, opts), num_workers=dc.workers)
  return stream.EvalSet(val_src, opts, num_workers=dc.workers)


def open_sources(config: Config, num_workers: int = 0
                 ) -> tuple[stream.Source, stream.Source | None]:
  """``(train source, validation source or None)`` of ``config.data``, checked and listed, never
  decoded: ``data.val_source`` (its ``val_split``) when set, else the stratified ``data.val_fraction``
  carved out of the training source (``split_seed``), else None. The one split both this module and
  ``tools/torch_reference.py`` use, so that they hold out the same images. ``config`` is not mutated.

  Raises:
    jaxft.data.DataError: bad data (unreadable files without ``data.skip_corrupt``, an empty class
      folder, a single class, grain missing).
  """
  dc = config.data
  common = dict(skip_corrupt=dc.skip_corrupt, num_workers=num_workers,
                cache_dir=dc.cache_dir or None)
  train = stream.open_source(dc.source, "train", limit=dc.limit or None, **common)
  stream.check_classes(train.class_names, dc.source)
  if dc.val_source:
    return train, stream.open_source(dc.val_source, dc.val_split, **common)
  if dc.val_fraction > 0:
    return data_lib.split_train_val(train, dc.val_fraction, dc.split_seed)
  return train, None


def load_stream_data(config: Config) -> tuple[stream.Source, stream.EvalSet | None]:
  """Returns ``(train source, val)``: the training examples as a stream source, and the validation
  examples as an :class:`~jaxft.data.stream.EvalSet` (None when ``data.val_fraction`` is 0 and there
  is no ``data.val_source``). With ``data.pipeline = 'stream'`` both stream (host memory bounded);
  with ``'auto'`` each is held decoded when it fits what is left of ``data.memory_mb`` (train first).
  ``config`` is not mutated.

  Raises:
    TrainError: bad data (the :class:`~jaxft.data.DataError` message): unreadable files without
      ``data.skip_corrupt``, an empty class folder, a single class, grain missing.
  """
  dc = config.data
  budget = dc.memory_mb * 2**20
  try:
    train, val_src = open_sources(config, dc.workers)
    train, held = _hold_train(config, train, budget)
    val = None if val_src is None else _eval_set(config, val_src, budget - held)
  except data_lib.DataError as e:
    raise TrainError(str(e)) from None
  logging.info("train (streamed): %d images, %d classes, %d skipped", len(train), train.num_classes,
               len(getattr(train, "skipped", ())))
  if val is not None:
    logging.info("val: %d images (%s)", len(val), "held decoded" if val.held is not None else "streamed")
  return train, val


def train_batches(config: Config, train: stream.Source, start_step: int, num_steps: int,
                  hosts: tuple[int, int]) -> Any:
  """A :class:`~jaxft.data.stream.StreamIterator` over steps ``start_step …`` of ``train``: what
  :func:`jaxft.data.iterate` yields, with the same examples at every step; of host ``hosts[0]`` of
  ``hosts[1]`` only this host's slice of each batch is decoded.
  """
  try:
    ds = stream.train_dataset(train, options(config, train=True), batch_size=config.train.batch_size,
                              seed=config.seed, process_index=hosts[0], process_count=hosts[1])
  except data_lib.DataError as e:
    raise TrainError(str(e)) from None
  return stream.StreamIterator(ds, start_step, num_steps, num_workers=config.data.workers)
