"""The training input pipeline on the host: a validation split, the epoch order, the example indices of
each step, and batches gathered ahead in a background thread.

The examples of every step are a function of ``(n, batch_size, seed, step)`` only (:func:`batch_indices`),
so a run resumed at step ``k`` sees exactly the batches an uninterrupted run sees. Nothing here mutates
its inputs.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from jaxft.data.dataset import DataError, Dataset


def split_train_val(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
  """Splits ``ds`` into disjoint (train, val) parts, stratified by class.

  Within each class the examples are shuffled with a generator seeded by ``(seed, class index)`` and the
  first ``round(n_class * val_fraction)`` go to validation (at least one when ``val_fraction > 0`` and
  the class has two or more examples), so the split depends only on ``seed``, the labels and the order
  of ``ds``. Both parts keep the original order of ``ds``.

  Args:
    ds: the dataset; not mutated.
    val_fraction: in ``[0, 1)``; ``0`` gives an empty validation set.
    seed: a non-negative int.

  Returns:
    ``(train, val)``, new datasets whose indices together cover ``ds`` exactly once.

  Raises:
    ValueError: ``val_fraction`` outside ``[0, 1)`` or a negative seed.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  _check_seed(seed)
  val_mask = np.zeros(len(ds), bool)
  for c in range(ds.num_classes):
    idx = np.flatnonzero(ds.labels == c)
    n_val = int(round(len(idx) * val_fraction))
    if val_fraction > 0 and len(idx) >= 2:
      n_val = min(max(n_val, 1), len(idx) - 1)
    perm = np.random.default_rng([seed, c]).permutation(len(idx))
    val_mask[idx[perm[:n_val]]] = True
  return ds.subset(np.flatnonzero(~val_mask)), ds.subset(np.flatnonzero(val_mask))


def take_per_class(ds: Dataset, per_class: int, seed: int) -> tuple[Dataset, Dataset]:
  """Splits ``ds`` into ``(taken, rest)``: ``per_class`` examples of every class, and all the others.

  Within each class the examples are shuffled with a generator seeded by ``(seed, class index)`` and
  the first ``per_class`` are taken, so the choice depends only on ``seed``, the labels and the order of
  ``ds``, and with one seed the examples taken for a smaller ``per_class`` are among those taken for a
  larger one. Both parts keep the original order of ``ds``. This is the low-data training set
  (``data.per_class``); the validation set is then carved out of ``rest`` (:func:`split_train_val`).

  Args:
    ds: the dataset; not mutated.
    per_class: a positive int, at most the size of the smallest class.
    seed: a non-negative int.

  Returns:
    ``(taken, rest)``, new datasets whose indices together cover ``ds`` exactly once.

  Raises:
    DataError: a class with fewer than ``per_class`` examples (naming it and its count).
    ValueError: ``per_class`` not a positive int, or a negative seed.
  """
  if not isinstance(per_class, (int, np.integer)) or isinstance(per_class, bool) or per_class <= 0:
    raise ValueError(f"per_class must be a positive int, got {per_class!r}")
  _check_seed(seed)
  counts = np.bincount(ds.labels, minlength=ds.num_classes)
  short = [f"{ds.class_names[c]!r} ({counts[c]})" for c in range(ds.num_classes) if counts[c] < per_class]
  if short:
    raise DataError(f"data.per_class={per_class} but {len(short)} class(es) have fewer training images: "
                    f"{', '.join(short[:5])}{', …' if len(short) > 5 else ''}; lower data.per_class to "
                    f"at most {int(counts.min())} or add images")
  take = np.zeros(len(ds), bool)
  for c in range(ds.num_classes):
    idx = np.flatnonzero(ds.labels == c)
    # Its own stream, not split_train_val's (seed, c) one, so the validation split of the rest does not
    # start from the same shuffle as the examples taken.
    perm = np.random.default_rng([seed, c, 1]).permutation(len(idx))
    take[idx[perm[:per_class]]] = True
  return ds.subset(np.flatnonzero(take)), ds.subset(np.flatnonzero(~take))


def _check_seed(seed: int) -> None:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False  # Shared by every caller through the cache.
  return perm


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch ``epoch`` visits ``n`` examples: a function of ``(n, seed, epoch)`` only.

  Returns:
    A new ``int64 [n]`` permutation of ``range(n)``.

  Raises:
    ValueError: negative ``seed`` or ``epoch``.
  """
  _check_seed(seed)
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0, got {epoch}")
  return _permutation(int(n), int(seed), int(epoch)).copy()


def steps_per_epoch(n: int, batch_size: int) -> int:
  """``n // batch_size``: the last partial batch of every epoch is dropped.

  Raises:
    DataError: when ``batch_size`` is not positive or larger than ``n``.
  """
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if batch_size > n:
    raise DataError(f"batch_size {batch_size} is larger than the dataset ({n} examples); lower "
                    "batch_size or use more data")
  return n // batch_size


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The example indices of global training step ``step``.

  Step ``s`` belongs to epoch ``s // steps_per_epoch`` and takes the ``s % steps_per_epoch``-th slice of
  that epoch's :func:`epoch_permutation` (partial batches are dropped). Being a pure function of the
  step, a run resumed at step ``k`` sees exactly the batches an uninterrupted run sees.

  Returns:
    A new ``int64 [batch_size]`` array.

  Raises:
    DataError: bad ``batch_size`` (see :func:`steps_per_epoch`).
    ValueError: negative ``step`` or ``seed``.
  """
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  _check_seed(seed)
  epoch, i = divmod(int(step), steps_per_epoch(n, batch_size))
  return _permutation(int(n), int(seed), epoch)[i * batch_size:(i + 1) * batch_size].copy()


Batch = tuple[int, np.ndarray, np.ndarray]
_END = object()


class Prefetcher:
  """Iterates over ``produce(step)`` for ``steps``, computed ahead in a background thread.

  A small bounded queue keeps host memory flat while letting batch assembly overlap device work;
  ``wait_seconds`` accumulates how long the consumer blocked waiting for data, so the train loop can
  report whether it is input-bound. An exception in ``produce`` is re-raised by ``next()``.
  Use as an iterator, ideally in a ``with`` block (or call :meth:`close`) to stop the thread early.
  """

  def __init__(self, produce: Callable[[int], Any], steps: Iterator[int] | range, buffer_size: int = 2):
    if buffer_size < 1:
      raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    self.wait_seconds = 0.0
    self._queue: queue.Queue[Any] = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._work, args=(produce, iter(steps)), daemon=True,
                                    name="jaxft-prefetch")
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _work(self, produce: Callable[[int], Any], steps: Iterator[int]) -> None:
    try:
      for step in steps:
        if not self._put(produce(step)):
          return
      self._put(_END)
    except BaseException as e:  # Handed to the consumer, which re-raises it.
      self._put(e)

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    start = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._done = True
      raise item
    return item

  def close(self) -> None:
    """Stops the background thread (it finishes the item it is computing) and ends iteration."""
    self._done = True
    self._stop.set()
    self._thread.join(timeout=5.0)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def iterate(ds: Dataset, batch_size: int, seed: int, start_step: int = 0,
            num_steps: int | None = None, buffer_size: int = 2, process_index: int = 0,
            process_count: int = 1) -> Prefetcher:
  """Yields ``(step, images uint8 [B/P, H, W, 3], labels int32 [B/P])`` for steps ``start_step,
  start_step + 1, …`` (``num_steps`` of them, or forever), gathered by :func:`batch_indices` in a
  background thread: host ``process_index`` of ``process_count`` (``P``) gets rows
  ``[p B/P, (p + 1) B/P)`` of the sorted global batch (all of it with the defaults).

  Args:
    ds: the training set; not mutated (batches are copies).
    batch_size: examples per step; the last partial batch of each epoch is dropped.
    seed: shuffling seed.
    start_step: the global step to start at (the resume point).
    num_steps: how many steps to yield; ``None`` for an endless stream.
    buffer_size: how many batches may be prepared ahead.
    process_index, process_count: this host and the number of hosts (``batch_size`` divisible by it).

  Returns:
    A :class:`Prefetcher` (an iterator; close it, or use it in a ``with`` block, to stop early).

  Raises:
    DataError: bad ``batch_size``, raised here rather than from the background thread.
  """
  steps_per_epoch(len(ds), batch_size)
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise DataError(f"batch_size {batch_size} must be divisible by the {process_count} hosts, and "
                    f"host {process_index} one of them")
  local = batch_size // process_count
  _check_seed(seed)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  steps = itertools.count(start_step) if num_steps is None else range(start_step, start_step + num_steps)

  def produce(step: int) -> Batch:
    idx = np.sort(batch_indices(len(ds), batch_size, seed, step))
    # Sorting makes the gather cache-friendly; order inside a batch does not matter to training.
    idx = idx[process_index * local:(process_index + 1) * local]
    return step, ds.images[idx], ds.labels[idx]

  return Prefetcher(produce, steps, buffer_size)
