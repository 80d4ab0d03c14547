"""The streaming input pipeline, on grain: images decoded and cropped per step, never all held at once.

A *stream source* is a list of files (``folder:PATH``, checked once for unreadable images by
:func:`scan_files`), such a list held decoded (:mod:`jaxft.data.decoded`, ``data.pipeline='auto'``),
random-access records (``arrayrecord:`` / ``tfds:``, :mod:`jaxft.data.records`) or decoded arrays
(``cifar:``, ``sklearn:``): anything with ``item(i)``, ``labels``, ``class_names``. The
pipeline is a grain ``MapDataset`` whose element ``k`` is this host's share of the batch of step ``k``:

1. the examples of step ``k`` are :func:`jaxft.data.pipeline.batch_indices` (the per-epoch shuffle from
   ``(seed, epoch)``, partial batches dropped), sorted, as the in-memory pipeline gathers them, so both
   pipelines train on the same examples at every step;
2. host ``p`` of ``P`` takes positions ``[p * B/P, (p + 1) * B/P)`` of that global batch;
3. each example is decoded and transformed (:mod:`jaxft.data.host_transforms`) with a generator seeded
   by ``(seed, step, position in the global batch)``;
4. grain batches them into ``{'image': uint8 [B/P, S, S, 3], 'label': int32 [B/P]}``, in threads
   (``ReadOptions``) and, when asked, worker processes (``mp_prefetch``).

Every batch is therefore a pure function of ``(source, options, seed, step)``: the worker and thread
counts change only the speed, and the iterator's position is the step number (:class:`StreamIterator`).
Grain's own iterator state would also work, but it records one position per worker and cannot be
restored with another worker count; the step can, and the train state already checkpoints it.

Host memory is bounded by the buffers (see :func:`buffered_batches`), not by the dataset: a file source
holds only paths and labels. Nothing here mutates its inputs or the files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from jaxft.data import cache, decode, host_augment, host_transforms, pipeline, sources
from jaxft.data.dataset import DataError, Dataset

MAX_LISTED = 5  # unreadable files named in the log / error
# Below this many files, checking them in worker processes costs more than it saves.
SCAN_POOL_MIN_FILES = 4096
_READ_ERRORS = decode._DECODE_ERRORS  # pylint: disable=protected-access


def _grain() -> Any:
  """The grain module, imported on first use (it imports JAX).

  Raises:
    DataError: grain is not installed.
  """
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError("the streaming pipeline needs grain, which is not installed; "
                    "pip install 'jaxft[stream]' (or pip install grain)") from None
  return grain


# --- sources ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Image files and their labels; only the paths are held (what grain sends each worker).

  Attributes:
    paths: one path per example, as ``str``.
    labels: ``int32 [N]``.
    class_names: label ``i`` is ``class_names[i]``.
    skipped: the unreadable files left out, ``(path, reason)`` (see :func:`scan_files`).
  """

  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  skipped: tuple[tuple[str, str], ...] = ()
  sizes: np.ndarray | None = None  # int32 [N, 2]: each image's (width, height), from the check

  def __len__(self) -> int:
    return len(self.paths)

  def item(self, i: int) -> tuple[host_transforms.ImageInput, int]:
    """``(path, label)`` of example ``i``."""
    return self.paths[i], int(self.labels[i])

  @property
  def num_classes(self) -> int:
    """``len(class_names)``."""
    return len(self.class_names)

  def subset(self, indices: Sequence[int] | np.ndarray) -> FileSource:
    """A new source of the examples at ``indices``, in that order (``self`` is not mutated)."""
    idx = np.asarray(indices, np.int64)
    return FileSource(tuple(self.paths[i] for i in idx), self.labels[idx], self.class_names, self.skipped,
                      None if self.sizes is None else self.sizes[idx])

  def fingerprint(self) -> dict[str, Any]:
    """What a workdir records of this data: count, classes, and the sha256 of every path, size, mtime
    and label (the pixels are not read)."""
    h = hashlib.sha256()
    for p, label in zip(self.paths, self.labels.tolist()):
      h.update(repr((p, *cache.file_stat(Path(p)), label)).encode())
    return {"n": len(self), "class_names": list(self.class_names), "image_shape": None,
            "sha256": h.hexdigest()}


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Decoded images held in memory (the fast path for small data and for non-file sources).

  Attributes:
    images: ``uint8 [N, H, W, 3]``; labels: ``int32 [N]``; class_names as :class:`FileSource`.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  @classmethod
  def from_dataset(cls, ds: Dataset) -> ArraySource:
    """The same examples as ``ds`` (its arrays, shared, not copied)."""
    return cls(ds.images, ds.labels, ds.class_names)

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def item(self, i: int) -> tuple[host_transforms.ImageInput, int]:
    """``(image uint8 [H, W, 3], label)`` of example ``i``."""
    return self.images[i], int(self.labels[i])

  @property
  def num_classes(self) -> int:
    """``len(class_names)``."""
    return len(self.class_names)

  def subset(self, indices: Sequence[int] | np.ndarray) -> ArraySource:
    """A new source of the examples at ``indices`` (copies; ``self`` is not mutated)."""
    idx = np.asarray(indices, np.int64)
    return ArraySource(self.images[idx], self.labels[idx], self.class_names)

  def fingerprint(self) -> dict[str, Any]:
    """As :func:`jaxft.train.workdir.data_identity` records a :class:`Dataset`."""
    h = hashlib.sha256()
    for a in (self.images, self.labels):
      h.update(np.ascontiguousarray(a).data)
    return {"n": len(self), "class_names": list(self.class_names),
            "image_shape": list(self.images.shape[1:]), "sha256": h.hexdigest()}


Source = Any  # FileSource | ArraySource | jaxft.data.decoded.DecodedSource | jaxft.data.records.RecordSource


def _check_file(path: str) -> list[int] | str:
  """``[width, height]`` when ``path`` decodes to RGB, else why not (one line). (Not None: grain drops
  Nones.)"""
  try:
    with Image.open(path) as im:
      size = [int(im.size[0]), int(im.size[1])]
      im.draft("RGB", (1, 1))  # a JPEG is still read to its end at 1/8 scale, so truncation shows
      decode.to_rgb(im).load()
    return size
  except _READ_ERRORS as e:
    return f"{type(e).__name__}: {e}"


Verdict = str | tuple[int, int]  # why a file is unreadable, or its (width, height)


def scan_files(paths: Sequence[str], num_workers: int = 0) -> list[Verdict]:
  """Decodes every file once (JPEGs at 1/8 scale) and keeps only the verdict, so memory stays flat.

  Returns:
    One entry per path, in order: its ``(width, height)`` when it decodes to RGB, else the reason
    (a string) it does not.
  """
  grain = _grain()

  if not paths:
    return []
  ds = grain.MapDataset.source(list(paths)).map(_check_file).batch(64, batch_fn=list)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if num_workers > 0 and len(paths) >= SCAN_POOL_MIN_FILES:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    _let_grain_read_its_flag()
  return [r if isinstance(r, str) else (int(r[0]), int(r[1])) for batch in it for r in batch]


def _cached_scan(paths: list[str], num_workers: int, cache_dir: str | Path | None | bool,
                 root: Path) -> list[Verdict]:
  """:func:`scan_files`, its verdicts kept in the cache directory (JSON) under a key of every path,
  size and mtime, so that a rerun or resume of a large folder does not decode it all again."""
  listing = [[p, *cache.file_stat(Path(p))] for p in paths]
  where = cache.cache_file(cache_dir, "scan", root, {"version": 2, "listing": listing})
  where = where.with_suffix(".json") if where is not None else None
  if where is not None and where.is_file():
    try:
      verdicts = json.loads(where.read_text())
      if isinstance(verdicts, list) and len(verdicts) == len(paths):
        return [v if isinstance(v, str) else (int(v[0]), int(v[1])) for v in verdicts]
    except (OSError, ValueError):
      pass  # unreadable: check again and rewrite
  verdicts = scan_files(paths, num_workers)
  if where is not None:
    try:
      where.parent.mkdir(parents=True, exist_ok=True)
      tmp = where.with_suffix(f".tmp{os.getpid()}")
      tmp.write_text(json.dumps(verdicts))
      os.replace(tmp, where)  # atomic: a reader sees the old file or the whole new one
    except OSError as e:
      logging.warning("could not cache the file check in %s (%s)", where, e)
  return verdicts


def open_folder(source: str, split: str = "train", *, skip_corrupt: bool = False,
                num_workers: int = 0, limit: int | None = None,
                cache_dir: str | Path | None | bool = None) -> FileSource:
  """Lists ``folder:PATH`` (as :func:`jaxft.data.load_source`: ``PATH/<class>/`` or
  ``PATH/<split>/<class>/``; ``limit`` files taken round-robin over the classes) and checks every
  file once (:func:`scan_files`; the verdicts are cached in ``cache_dir`` as
  :func:`jaxft.data.load_source` caches arrays, ``False`` = no cache).

  Unreadable files (corrupt, truncated, empty, not an image) are skipped when ``skip_corrupt``, with
  their count and the first :data:`MAX_LISTED` paths logged; otherwise they stop the load, listed.

  Returns:
    A new :class:`FileSource`; no file is modified.

  Raises:
    DataError: a missing folder, no class folders, a class folder without images, unreadable files
      (without ``skip_corrupt``), or a class whose every file is unreadable.
  """
  scheme, _, rest = source.partition(":")
  if scheme != "folder" or not rest:
    raise DataError(f"the streaming pipeline lists folders only ('folder:PATH'), got {source!r}; "
                    "other sources stream from memory (open_source)")
  path = Path(rest).expanduser()
  if not path.is_dir():
    raise DataError(f"data path {str(path)!r} (from source {source!r}) is not a directory; check the path")
  root = sources._folder_root(path.resolve(), split)  # pylint: disable=protected-access
  class_names, files = sources._list_folder(root, limit)  # pylint: disable=protected-access
  verdicts = _cached_scan([str(f) for f, _ in files], num_workers, cache_dir, root)
  bad = [(str(f), why) for (f, _), why in zip(files, verdicts) if isinstance(why, str)]
  if bad:
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:MAX_LISTED])
    if not skip_corrupt:
      raise DataError(f"{len(bad)} unreadable image file(s) under {str(root)!r}: {listed}; remove or "
                      "replace them, or set data.skip_corrupt=True to skip them")
    logging.warning("skipped %d unreadable image file(s) under %s, first: %s", len(bad), root, listed)
  good = [(str(f), label, why) for (f, label), why in zip(files, verdicts) if not isinstance(why, str)]
  labels = np.asarray([label for _, label, _ in good], np.int32)
  sizes = np.asarray([size for _, _, size in good], np.int32).reshape(-1, 2)
  empty = [class_names[c] for c in range(len(class_names)) if not np.any(labels == c)]
  if empty:
    raise DataError(f"class folder(s) {empty} under {str(root)!r} hold no readable image; add images "
                    "or remove the folder")
  return FileSource(tuple(p for p, _, _ in good), labels, class_names, tuple(bad), sizes)


def check_classes(class_names: Sequence[str], where: str) -> None:
  """Raises DataError when a training split has fewer than two classes (nothing to learn)."""
  if len(class_names) < 2:
    raise DataError(f"the training data {where!r} has a single class ({list(class_names)}); a "
                    "classifier needs two or more, one sub-folder per class")


def open_source(source: str, split: str = "train", *, skip_corrupt: bool = False,
                num_workers: int = 0, **load_kwargs: Any) -> Source:
  """A :class:`FileSource` for ``folder:`` sources, a random-access record source
  (:mod:`jaxft.data.records`) for ``arrayrecord:`` and ``tfds:`` ones, else the decoded arrays of
  :func:`jaxft.data.load_source` (``cifar:``, ``sklearn:``) as an :class:`ArraySource`.

  Raises:
    DataError: as :func:`open_folder` or :func:`jaxft.data.load_source`.
  """
  if source.startswith("folder:"):
    return open_folder(source, split, skip_corrupt=skip_corrupt, num_workers=num_workers,
                       limit=load_kwargs.get("limit"), cache_dir=load_kwargs.get("cache_dir"))
  if source.startswith(("arrayrecord:", "tfds:")):  # random access: examples read when needed
    from jaxft.data import records  # pylint: disable=g-import-not-at-top
    opened = (records.open_arrayrecord(source, split) if source.startswith("arrayrecord:")
              else records.open_tfds(source, split))
    limit = load_kwargs.get("limit")
    return opened if not limit or limit >= len(opened) else opened.subset(np.arange(limit))
  return ArraySource.from_dataset(sources.load_source(source, split=split, skip_corrupt=skip_corrupt,
                                                      **load_kwargs))


# --- the pipeline -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How each example becomes a ``size`` x ``size`` image (see :mod:`jaxft.data.host_transforms`).

  Attributes:
    size: output side in pixels.
    train: random-resized crop (``scale``, ``ratio``) + ``flip`` + ``color_jitter`` + the ``augment``
      policy (``num_ops``, ``magnitude``: :mod:`jaxft.data.host_augment`); else resize-shorter + centre
      crop (``crop_pct``).
    draft: decode JPEGs at the smallest DCT scale that keeps the crop at ``size`` or more.
  """

  size: int
  train: bool = True
  scale: tuple[float, float] = host_transforms.DEFAULT_SCALE
  ratio: tuple[float, float] = host_transforms.DEFAULT_RATIO
  flip: bool = True
  crop_pct: float = host_transforms.DEFAULT_CROP_PCT
  draft: bool = True
  augment: str = "none"  # train: a host_augment.POLICIES name
  num_ops: int = 2  # randaugment: ops per image
  magnitude: int = 9  # randaugment: 0 … 30
  color_jitter: float = 0.0  # train: brightness / contrast / saturation strength

  def __post_init__(self) -> None:
    problems = []
    if not isinstance(self.size, int) or self.size <= 0:
      problems.append(f"size must be a positive int, got {self.size!r}")
    if not 0 < self.scale[0] <= self.scale[1] <= 1:
      problems.append(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
    if not 0 < self.ratio[0] <= self.ratio[1]:
      problems.append(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
    if not 0 < self.crop_pct <= 1:
      problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
    if self.augment not in host_augment.POLICIES:
      problems.append(f"augment must be one of {host_augment.POLICIES}, got {self.augment!r}")
    if not 0 <= self.magnitude < host_augment.MAGNITUDE_BINS or self.num_ops < 0 or self.color_jitter < 0:
      problems.append(f"need 0 <= magnitude <= 30, num_ops >= 0, color_jitter >= 0; got "
                      f"{self.magnitude}, {self.num_ops}, {self.color_jitter}")
    if problems:
      raise DataError("; ".join(problems))


@functools.lru_cache(maxsize=4)
def _sorted_step_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  return np.sort(pipeline.batch_indices(n, batch_size, seed, step))


@dataclasses.dataclass(frozen=True)
class _Example:
  """Stream position → one transformed example (a picklable callable: grain sends it to workers)."""

  source: Source
  options: StreamOptions
  seed: int
  batch_size: int  # global
  host_batch: int
  process_index: int

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    step, j = divmod(int(position), self.host_batch)
    slot = self.process_index * self.host_batch + j  # the position in the global batch
    o = self.options
    if o.train:
      idx = int(_sorted_step_indices(len(self.source), self.batch_size, self.seed, step)[slot])
    else:
      idx = int(position)
      if idx >= len(self.source):  # the padding of the last batch (eval_dataset)
        return {"image": np.zeros((o.size, o.size, 3), np.uint8), "label": np.int32(-1)}
    image, label = self.source.item(idx)
    try:
      if o.train:
        rng = np.random.default_rng([self.seed, step, slot])
        pixels = host_transforms.train_transform(image, rng, o.size, o.scale, o.ratio, o.flip, o.draft,
                                                 o.augment, o.num_ops, o.magnitude, o.color_jitter)
      else:
        pixels = host_transforms.eval_transform(image, o.size, o.crop_pct, o.draft)
    except _READ_ERRORS as e:
      what = repr(image) if isinstance(image, (str, Path)) else f"example {idx}"
      raise DataError(f"cannot decode {what} ({type(e).__name__}: {e}): it changed after it was "
                      "checked; restore the file or rerun, which checks the folder again") from None
    return {"image": pixels, "label": np.int32(label)}


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only the parent process asks)
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def train_dataset(source: Source, options: StreamOptions, *, batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None) -> Any:
  """The endless training stream as a grain ``MapDataset``: element ``k`` is this host's part of the
  batch of step ``k``, ``{'image': uint8 [B/P, S, S, 3], 'label': int32 [B/P]}``.

  Args:
    source: the examples (not mutated). options: the train transform (``options.train`` must be true).
    batch_size: the global batch ``B``, divisible by the host count ``P``.
    seed: shuffle and augmentation seed (a non-negative int).
    process_index, process_count: this host and the host count; None = ``jax.process_index()`` /
      ``jax.process_count()``.

  Raises:
    DataError: a source with fewer than two classes; a batch larger than the data, or not divisible by
      the host count; eval options.
  """
  grain = _grain()

  p, count = _hosts(process_index, process_count)
  if not options.train:
    raise DataError("train_dataset needs StreamOptions(train=True); use eval_dataset for evaluation")
  if batch_size % count:
    raise DataError(f"batch_size {batch_size} is not divisible by the {count} hosts; pick a multiple")
  check_classes(source.class_names, "train_dataset source")
  pipeline.steps_per_epoch(len(source), batch_size)  # raises on a batch larger than the data
  pipeline._check_seed(seed)  # pylint: disable=protected-access
  host_batch = batch_size // count
  fn = _Example(source, options, int(seed), batch_size, host_batch, p)
  endless = (2 ** 62 // host_batch) * host_batch  # grain datasets have a length; this one never ends
  return grain.MapDataset.range(endless).map(fn).batch(host_batch, drop_remainder=True)


def eval_positions(n: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """The example of each row host ``p`` of ``P`` feeds: global batch ``g`` holds examples
  ``[g B, (g + 1) B)`` and host ``p`` its rows ``[p B/P, (p + 1) B/P)``, the last batch padded with
  positions ``>= n`` (so that every host runs the same number of batches, as collectives need).

  Returns:
    ``int64 [ceil(n / B) * B / P]``, a new array.
  """
  local = batch_size // process_count
  starts = np.arange(0, -(-n // batch_size) * batch_size, batch_size) + process_index * local
  return (starts[:, None] + np.arange(local)[None, :]).reshape(-1)


def eval_dataset(source: Source, options: StreamOptions, *, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None) -> Any:
  """Every example once, in order, as a grain ``MapDataset`` of this host's ``batch_size / P`` rows
  of each global batch (:func:`eval_positions`); rows past the end are zero images labelled ``-1``.

  Raises:
    DataError: train options, or a batch size not divisible by the host count.
  """
  grain = _grain()

  p, count = _hosts(process_index, process_count)
  if options.train:
    raise DataError("eval_dataset needs StreamOptions(train=False); use train_dataset for training")
  if batch_size <= 0 or batch_size % count:
    raise DataError(f"eval batch_size {batch_size} must be positive and divisible by {count} hosts")
  fn = _Example(source, options, 0, batch_size, batch_size // count, p)
  positions = eval_positions(len(source), batch_size, p, count).tolist()
  return grain.MapDataset.source(positions).map(fn).batch(batch_size // count)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Held-out examples through the eval transform, one interface for both ways of holding them:
  decoded once into ``held`` (a :class:`Dataset` of crops, when they fit in memory) or streamed from
  ``source`` at every pass (``held`` None). Either way :meth:`local_batches` yields the same pixels.

  Attributes:
    source: the examples. options: the eval transform. held: the crops, or None.
    num_workers: grain worker processes of a streamed pass (0: threads of this process).
  """

  source: Source
  options: StreamOptions
  held: Dataset | None = None
  num_workers: int = 0

  def __len__(self) -> int:
    return len(self.source)

  @property
  def labels(self) -> np.ndarray:
    return np.asarray(self.source.labels, np.int32)

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.source.class_names)

  @property
  def skipped(self) -> int:
    return len(getattr(self.source, "skipped", ()))

  def fingerprint(self) -> dict[str, Any]:
    """The source's, with the eval crop size as the image shape (the same held or streamed)."""
    return {**self.source.fingerprint(), "image_shape": [self.options.size, self.options.size, 3]}

  def local_batches(self, batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> Iterator[np.ndarray]:
    """This host's rows of each global batch of ``batch_size`` (:func:`eval_positions`), in order, as
    ``uint8 [B/P, S, S, 3]``; the last batch zero-padded. Nothing is mutated."""
    if self.held is not None:
      positions = eval_positions(len(self), batch_size, process_index, process_count)
      local = batch_size // process_count
      for rows in positions.reshape(-1, local):
        out = np.zeros((local, *self.held.images.shape[1:]), np.uint8)
        valid = rows < len(self)
        out[valid] = self.held.images[rows[valid]]
        yield out
      return
    ds = eval_dataset(self.source, self.options, batch_size=batch_size, process_index=process_index,
                      process_count=process_count)
    grain = _grain()
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    if self.num_workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
      _let_grain_read_its_flag()
    for batch in it:
      yield np.array(batch["image"])


def eval_arrays(source: Source, options: StreamOptions, batch_size: int = 64) -> Dataset:
  """Every example of ``source`` through the eval transform, once, as an in-memory :class:`Dataset`
  (``uint8 [N, S, S, 3]``): the eval transform is deterministic, so validation decodes only once.

  Returns:
    A new Dataset (``skipped`` = the source's skipped files); ``source`` is not mutated.
  """
  ds = eval_dataset(source, options, batch_size=batch_size, process_index=0, process_count=1)
  batches = list(ds.to_iter_dataset(_grain().ReadOptions(num_threads=2, prefetch_buffer_size=2)))
  images = (np.concatenate([b["image"] for b in batches])[:len(source)] if batches
            else np.zeros((0, options.size, options.size, 3), np.uint8))
  return Dataset(images, np.asarray(source.labels, np.int32), source.class_names,
                 skipped=len(getattr(source, "skipped", ())))


def buffered_batches(num_workers: int, num_threads: int, worker_buffer: int) -> int:
  """The most batches a :class:`StreamIterator` holds at once: each process (the workers, or this one
  when there are none) buffers ``num_threads`` batches being built plus its read-ahead; each worker
  also ``worker_buffer`` finished ones. Independent of the dataset's size."""
  per_process = 2 * max(num_threads, 1)
  if num_workers == 0:
    return per_process
  return num_workers * (per_process + worker_buffer)


def _let_grain_read_its_flag() -> None:
  """Works around grain 0.2.18 reading its absl flag ``--grain_enable_multiprocess_worker_profiling``
  with ``.value`` (in a thread, at the first batch of ``mp_prefetch``), which absl refuses before a
  command line is parsed (a library user, pytest). Marking that one flag present makes absl hand out
  its default (False), as if ``--grain_enable_multiprocess_worker_profiling=false`` had been passed;
  no other flag or setting changes, and an absl program that parses flags is left alone.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top  (a grain dependency)

  name = "grain_enable_multiprocess_worker_profiling"
  if name in flags.FLAGS and not flags.FLAGS.is_parsed() and not flags.FLAGS[name].present:
    flags.FLAGS[name].present = 1


class StreamIterator:
  """Yields ``(step, images, labels)`` for steps ``start_step, start_step + 1, …`` of a
  :func:`train_dataset` (the shape :func:`jaxft.data.iterate` yields), through grain's threads and
  worker processes.

  Its position is :meth:`get_state` ``{'step': k}``; a new iterator built with ``start_step=k`` yields
  exactly what this one would have yielded next, whatever the worker count. ``wait_seconds`` counts
  how long ``next()`` blocked. Close it (or use ``with``) to stop the workers.
  """

  def __init__(self, dataset: Any, start_step: int = 0, num_steps: int | None = None,
               num_workers: int = 0, num_threads: int = 2, worker_buffer: int = 2):
    grain = _grain()
    import time  # pylint: disable=g-import-not-at-top

    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    self._clock = time.perf_counter
    stop = None if num_steps is None else start_step + num_steps
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1))
    ds = dataset[start_step:stop].to_iter_dataset(read)
    if num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=worker_buffer))
    if num_workers > 0:
      _let_grain_read_its_flag()
    self._it = iter(ds)
    self.step = start_step
    self.wait_seconds = 0.0

  def __iter__(self) -> Iterator[pipeline.Batch]:
    return self

  def __next__(self) -> pipeline.Batch:
    start = self._clock()
    batch = next(self._it)
    self.wait_seconds += self._clock() - start
    step, self.step = self.step, self.step + 1
    # Plain copies: from workers the leaves are grain shared-memory arrays, unlinked when dropped here.
    return step, np.array(batch["image"]), np.array(batch["label"])

  def get_state(self) -> dict[str, int]:
    """``{'step': the step the next batch belongs to}``: all a restart needs."""
    return {"step": self.step}

  def close(self) -> None:
    """Stops grain's threads and worker processes."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> StreamIterator:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
