"""Data: sources decoded once into uint8 arrays, a disk cache, validation splits, deterministic batching
and jit-compatible on-device preprocessing.

A source string names where images come from:

* ``folder:PATH`` — one sub-folder per class (sorted folder names give the label order); image files
  inside are decoded with pillow and converted to RGB.
* ``cifar:PATH`` — the standard CIFAR-10 python archive (``cifar-10-python.tar.gz``) or its extracted
  ``cifar-10-batches-py`` folder; ``split`` is ``train`` or ``test``.
* ``tfds:NAME`` — a TensorFlow Datasets dataset (needs ``pip install jaxft[tfds]``).
* ``sklearn:digits`` — scikit-learn's bundled handwritten digits (1,797 8×8 grey images, 10 classes; no
  download), upscaled to 32×32 RGB unless ``image_size`` says otherwise. ``split`` is ``train`` (the
  first 1,347), ``test`` (the last 450: other writers than most of ``train``) or ``all``.

Everything decoded lives in host memory as one ``uint8 [N, H, W, 3]`` array; batches are gathered by
index (:func:`batch_indices`) so that a resumed run sees exactly the batches an uninterrupted run sees,
and augmentation runs on device inside the jitted train step (:func:`augment`).

Nothing here mutates its inputs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

SCHEMES = ("folder", "cifar", "tfds", "sklearn")
NAMED_SCHEMES = ("tfds", "sklearn")  # sources that name a dataset rather than a path
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm"})
# Folder names that mark ``PATH/<split>/<class>/`` layouts (see ``_folder_root``).
SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})
# Bumped whenever the cached arrays would differ for the same inputs (decoding or key changes).
_CACHE_VERSION = 1


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


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------


def load_source(source: str, *, split: str = "train", image_size: int | None = None,
                limit: int | None = None, skip_corrupt: bool = False,
                cache_dir: str | Path | None | bool = None) -> Dataset:
  """Loads a whole split of ``source`` into memory, using the disk cache when it is valid.

  Args:
    source: ``folder:PATH``, ``cifar:PATH`` or ``tfds:NAME`` (see the module docstring). A ``folder``
      whose sub-folders are all split names (``train``, ``test``, ``val``, …) is read from
      ``PATH/<split>``; otherwise its sub-folders are the classes and ``split`` is not used.
    split: which split (``train``/``test`` for ``cifar``, any TFDS split string for ``tfds``).
    image_size: resize every image (bilinear) to ``image_size × image_size``. Needed for folders whose
      images differ in size.
    limit: load at most this many examples. For folders the files are taken round-robin over the classes
      (sorted file names within a class) so a small limit still covers every class; for ``cifar`` the
      first ``limit`` records; for ``tfds`` the split ``split[:limit]``. Counted before skipping.
    skip_corrupt: skip unreadable image files (logging how many; the count is ``Dataset.skipped``)
      instead of raising.
    cache_dir: where decoded arrays are cached as ``.npz``; ``None`` means ``$JAXFT_CACHE_DIR`` or
      ``~/.cache/jaxft``; ``False`` disables the cache. ``tfds`` sources are not cached (TFDS caches).

  Returns:
    A new :class:`Dataset`. Files on disk are never modified; only the cache directory is written.

  Raises:
    DataError: unknown scheme, missing path, a folder without class sub-folders or images, images of
      different sizes without ``image_size``, an unreadable image (naming the file) unless
      ``skip_corrupt``, a malformed CIFAR archive, or ``tensorflow_datasets`` not installed.
  """
  scheme, sep, rest = source.partition(":")
  if not sep or scheme not in SCHEMES:
    raise DataError(f"unknown data source {source!r}; valid sources are "
                    f"{', '.join(s + ':' + ('NAME' if s in NAMED_SCHEMES else 'PATH') for s in SCHEMES)}")
  if not rest:
    raise DataError(f"data source {source!r} names no {'dataset' if scheme in NAMED_SCHEMES else 'path'}")
  if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
    raise DataError(f"image_size must be a positive int or None, got {image_size!r}")
  if limit is not None and (not isinstance(limit, int) or limit <= 0):
    raise DataError(f"limit must be a positive int or None, got {limit!r}")
  if scheme == "tfds":
    return _load_tfds(rest, split=split, image_size=image_size, limit=limit)
  if scheme == "sklearn":  # small and bundled: decoded in milliseconds, so never cached
    return _load_sklearn(rest, split=split, image_size=image_size, limit=limit)

  path = Path(rest).expanduser()
  if not path.exists():
    raise DataError(f"data path {str(path)!r} (from source {source!r}) does not exist; check the path")
  path = path.resolve()
  if scheme == "folder":
    root = _folder_root(path, split)
    class_names, files = _list_folder(root, limit)
    fingerprint: Any = [[str(f.relative_to(root)), *_stat(f)] for f, _ in files]
    load = functools.partial(_load_folder, root, class_names, files, image_size, skip_corrupt)
  else:
    cifar = _cifar_location(path)
    fingerprint = _cifar_fingerprint(cifar)
    load = functools.partial(_load_cifar, cifar, split, image_size, limit)
    root = cifar

  cache_file = _cache_file(cache_dir, scheme, root, {
      "version": _CACHE_VERSION, "source": source, "path": str(root), "listing": fingerprint,
      "split": split, "image_size": image_size, "skip_corrupt": skip_corrupt, "limit": limit})
  if cache_file is not None:
    ds = _read_cache(cache_file)
    if ds is not None:
      logging.info("loaded %s from cache %s", source, cache_file)
      return ds
  start = time.perf_counter()
  ds = load()
  logging.info("decoded %s: %s in %.1fs", source, describe(ds), time.perf_counter() - start)
  if cache_file is not None:
    _write_cache(cache_file, ds)
  return ds


def _stat(f: Path) -> tuple[int, int]:
  st = f.stat()
  return st.st_size, st.st_mtime_ns


# --- folder -----------------------------------------------------------------------------------------


def _subdirs(path: Path) -> list[Path]:
  return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_root(path: Path, split: str) -> Path:
  """``PATH/<split>`` for a ``PATH/{train,test,…}/<class>/`` layout, else ``PATH`` itself."""
  if not path.is_dir():
    raise DataError(f"folder source {str(path)!r} is not a directory; pass a folder with one "
                    "sub-folder per class")
  subs = _subdirs(path)
  if subs and all(s.name in SPLIT_NAMES for s in subs):
    if not (path / split).is_dir():
      raise DataError(f"folder {str(path)!r} holds splits {[s.name for s in subs]} but no {split!r}; "
                      f"pass split= one of them")
    return path / split
  return path


def _list_folder(root: Path, limit: int | None) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
  classes = _subdirs(root)
  if not classes:
    raise DataError(f"folder {str(root)!r} has no class sub-folders; expected PATH/<class>/<image> "
                    "(one sub-folder per class)")
  per_class = [sorted(f for f in c.iterdir() if f.is_file() and not f.name.startswith(".")
                      and f.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
  for c, fs in zip(classes, per_class):
    if not fs:
      logging.warning("class folder %s holds no images (extensions %s)", c, sorted(IMAGE_EXTENSIONS))
  if not any(per_class):
    raise DataError(f"folder {str(root)!r} holds no image files (extensions "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}) in its class sub-folders")
  if limit is None:
    files = [(f, label) for label, fs in enumerate(per_class) for f in fs]
  else:
    # Round-robin so a small limit still covers every class; then label order for locality.
    order = [(i, label, f) for label, fs in enumerate(per_class) for i, f in enumerate(fs)]
    order.sort(key=lambda t: (t[0], t[1]))
    files = [(f, label) for _, label, f in sorted(order[:limit], key=lambda t: (t[1], t[0]))]
  return tuple(c.name for c in classes), files


def _decode_image(path: Path, image_size: int | None) -> np.ndarray:
  """Decodes one file to ``uint8 [H, W, 3]`` (resized to a square when ``image_size``)."""
  with Image.open(path) as im:
    if im.mode != "RGB":
      im = im.convert("RGB")
    if image_size is not None and im.size != (image_size, image_size):
      im = im.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _decode_chunk(paths: Sequence[Path], image_size: int | None
                  ) -> list[np.ndarray | tuple[Path, Exception]]:
  out: list[np.ndarray | tuple[Path, Exception]] = []
  for p in paths:
    try:
      out.append(_decode_image(p, image_size))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      out.append((p, e))
  return out


def _num_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


# Below this many files starting workers costs more than it saves.
_POOL_MIN_FILES = 4096


@functools.lru_cache(maxsize=1)
def _worker_code() -> str:
  """Source of a decode worker: the decode functions of this module plus a stdin/stdout main. Workers
  run it with ``python -c`` so they import only pillow and numpy (importing jaxft, hence jax, cost
  ~1.5 s of CPU per worker, as much as decoding 10,000 images)."""
  funcs = "\n\n".join(inspect.getsource(f) for f in (_decode_image, _decode_chunk))
  return f"""from __future__ import annotations
import pickle, sys
from pathlib import Path
from typing import Sequence
import numpy as np
from PIL import Image

{funcs}

paths, image_size = pickle.load(sys.stdin.buffer)
out = _decode_chunk(paths, image_size)
if all(isinstance(r, np.ndarray) and r.shape == out[0].shape for r in out):
  out = np.stack(out)  # one array pickles far faster than thousands of small ones
else:
  out = [r if isinstance(r, np.ndarray) else (r[0], str(r[1])) for r in out]
pickle.dump(out, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
"""


def _decode_many(paths: Sequence[Path], image_size: int | None
                 ) -> list[np.ndarray | tuple[Path, Exception]]:
  """Decodes large listings in worker processes, one contiguous share each.

  Threads do not help here: for 32x32 JPEGs most of pillow's time is Python (header parsing), not the
  GIL-free decode, and two threads measured slower than one. Workers are plain ``python -c``
  subprocesses rather than ``multiprocessing``: forking a process that runs JAX's threads can deadlock,
  and ``spawn`` re-imports the caller's ``__main__`` (breaking unguarded scripts). If a worker fails the
  files are decoded in this process instead.
  """
  workers = min(_num_workers(), 16)
  if workers < 2 or len(paths) < _POOL_MIN_FILES:
    return _decode_chunk(paths, image_size)
  share = -(-len(paths) // workers)
  parts = [list(paths[i:i + share]) for i in range(0, len(paths), share)]
  code = _worker_code()

  def run(part: list[Path]) -> list[np.ndarray | tuple[Path, Exception]]:
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((part, image_size)),
                          capture_output=True)
    if proc.returncode != 0:
      raise RuntimeError(proc.stderr.decode(errors="replace")[-2000:])
    out = pickle.loads(proc.stdout)
    if isinstance(out, np.ndarray):
      return list(out)
    return [r if isinstance(r, np.ndarray) else (r[0], OSError(r[1])) for r in out]

  try:
    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
      return [r for rs in pool.map(run, parts) for r in rs]
  except (OSError, RuntimeError, pickle.UnpicklingError) as e:
    logging.warning("decode workers failed (%s); decoding in this process", e)
    return _decode_chunk(paths, image_size)


def _load_folder(root: Path, class_names: tuple[str, ...], files: list[tuple[Path, int]],
                 image_size: int | None, skip_corrupt: bool) -> Dataset:
  decoded = _decode_many([f for f, _ in files], image_size)
  images, labels, bad = [], [], []
  for (f, label), d in zip(files, decoded):
    if isinstance(d, tuple):
      bad.append(d)
    else:
      images.append(d)
      labels.append(label)
  if bad and not skip_corrupt:
    path, err = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise DataError(f"cannot decode image {str(path)!r}: {err}{more}; remove or replace the file, or "
                    "pass skip_corrupt=True to skip unreadable images")
  if bad:
    logging.warning("skipped %d unreadable image(s) under %s, e.g. %s", len(bad), root, bad[0][0])
  if not images:
    raise DataError(f"no readable images under {str(root)!r}")
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    first = images[0].shape
    i = next(i for i, im in enumerate(images) if im.shape != first)
    ok = [f for (f, _), d in zip(files, decoded) if not isinstance(d, tuple)]
    raise DataError(f"images under {str(root)!r} differ in size ({first[1]}x{first[0]} in "
                    f"{ok[0].name}, {images[i].shape[1]}x{images[i].shape[0]} in {ok[i].name}); pass "
                    "image_size=N to resize every image to N x N")
  return Dataset(np.stack(images), np.asarray(labels, np.int32), class_names, skipped=len(bad))


# --- cifar ------------------------------------------------------------------------------------------


def _cifar_location(path: Path) -> Path:
  """The archive file or the folder holding ``batches.meta``."""
  if path.is_file():
    return path
  for cand in (path, path / "cifar-10-batches-py"):
    if (cand / "batches.meta").is_file():
      return cand
  if (path / "cifar-10-python.tar.gz").is_file():
    return path / "cifar-10-python.tar.gz"
  raise DataError(f"{str(path)!r} is not a CIFAR-10 python archive: expected cifar-10-python.tar.gz or "
                  "a cifar-10-batches-py folder holding batches.meta and data_batch_* / test_batch")


def _cifar_fingerprint(loc: Path) -> list[Any]:
  if loc.is_file():
    return [loc.name, *_stat(loc)]
  return [[f.name, *_stat(f)] for f in sorted(loc.iterdir()) if f.is_file()]


def _cifar_members(loc: Path) -> dict[str, bytes]:
  """``{basename: bytes}`` of the archive's (or folder's) files."""
  if loc.is_dir():
    return {f.name: f.read_bytes() for f in loc.iterdir() if f.is_file()}
  try:
    with tarfile.open(loc, "r:*") as tar:
      return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f"cannot read CIFAR archive {str(loc)!r}: {e}; re-download "
                    "cifar-10-python.tar.gz") from None


def _unpickle(name: str, blob: bytes, loc: Path) -> dict[bytes, Any]:
  # The CIFAR python format *is* a pickle; only load archives you trust.
  try:
    d = pickle.loads(blob, encoding="bytes")
  except Exception as e:  # pickle raises many types on garbage input.
    raise DataError(f"cannot unpickle {name} in {str(loc)!r}: {e}; the CIFAR archive is corrupt") from None
  if not isinstance(d, dict):
    raise DataError(f"{name} in {str(loc)!r} is not a CIFAR batch dict")
  return d


def _load_cifar(loc: Path, split: str, image_size: int | None, limit: int | None) -> Dataset:
  members = _cifar_members(loc)
  if split == "train":
    names = sorted(n for n in members if n.startswith("data_batch_"))
  elif split == "test":
    names = [n for n in ("test_batch",) if n in members]
  else:
    raise DataError(f"CIFAR split must be 'train' or 'test', got {split!r}")
  if "batches.meta" not in members or not names:
    raise DataError(f"{str(loc)!r} lacks batches.meta or the {split} batches (data_batch_* / test_batch);"
                    " it is not a complete CIFAR-10 python archive")
  meta = _unpickle("batches.meta", members["batches.meta"], loc)
  class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"])
  images, labels = [], []
  for n in names:
    d = _unpickle(n, members[n], loc)
    try:
      data = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32)
      lab = np.asarray(d[b"labels"], np.int32)
    except (KeyError, ValueError) as e:
      raise DataError(f"{n} in {str(loc)!r} is malformed ({e}); expected b'data' uint8 [N, 3072] and "
                      "b'labels'") from None
    # Rows are channel-major (1024 R, then G, then B values).
    images.append(data.transpose(0, 2, 3, 1))
    labels.append(lab)
    if limit is not None and sum(map(len, labels)) >= limit:
      break
  imgs = np.concatenate(images)[:limit]
  labs = np.concatenate(labels)[:limit]
  if image_size is not None and image_size != 32:
    imgs = _resize_all(imgs, image_size)
  return Dataset(np.ascontiguousarray(imgs), labs, class_names)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                   for im in images])


# --- tfds -------------------------------------------------------------------------------------------


def _load_tfds(name: str, *, split: str, image_size: int | None, limit: int | None) -> Dataset:
  try:
    import tensorflow_datasets as tfds  # Heavy and optional: imported only when asked for.
  except ImportError:
    raise DataError(f"source 'tfds:{name}' needs tensorflow_datasets, which is not installed; "
                    "pip install jaxft[tfds]") from None
  tfds_split = split if limit is None else f"{split}[:{limit}]"
  data, info = tfds.load(name, split=tfds_split, batch_size=-1, with_info=True)
  data = tfds.as_numpy(data)
  if "image" not in data or "label" not in data:
    raise DataError(f"tfds:{name} has features {sorted(data)}; expected 'image' and 'label'")
  images = np.asarray(data["image"], np.uint8)
  if images.ndim == 3 or images.shape[-1] == 1:  # grayscale → RGB
    images = np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=-1)
  if image_size is not None and images.shape[1:3] != (image_size, image_size):
    images = _resize_all(images, image_size)
  label_feature = info.features["label"]
  names = getattr(label_feature, "names", None) or [str(i) for i in range(label_feature.num_classes)]
  return Dataset(np.ascontiguousarray(images), np.asarray(data["label"], np.int32), tuple(names))


# --- sklearn -----------------------------------------------------------------------------------------

SKLEARN_DATASETS = ("digits",)
_DIGITS_TRAIN = 1347  # 75%; the rest (the file's last writers) is the test split


def _load_sklearn(name: str, *, split: str, image_size: int | None, limit: int | None) -> Dataset:
  if name not in SKLEARN_DATASETS:
    raise DataError(f"unknown scikit-learn dataset {name!r}; valid: {', '.join(SKLEARN_DATASETS)}")
  try:
    from sklearn.datasets import load_digits  # optional (pip install jaxft[quickstart])
  except ImportError:
    raise DataError(f"source 'sklearn:{name}' needs scikit-learn, which is not installed; "
                    "pip install jaxft[quickstart] (or pip install scikit-learn)") from None
  digits = load_digits()
  parts = {"train": slice(0, _DIGITS_TRAIN), "test": slice(_DIGITS_TRAIN, None), "all": slice(None)}
  if split not in parts:
    raise DataError(f"sklearn:{name} split must be one of {', '.join(parts)}, got {split!r}")
  grey = np.asarray(digits.images[parts[split]][:limit], np.float64)  # ink intensity 0…16
  grey = np.round(grey * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(grey[..., None], 3, axis=-1)
  images = _resize_all(images, image_size or 32)
  labels = np.asarray(digits.target[parts[split]][:limit], np.int32)
  return Dataset(np.ascontiguousarray(images), labels, tuple(str(i) for i in range(10)))


# --- cache ------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
  """``$JAXFT_CACHE_DIR`` or ``~/.cache/jaxft``."""
  return Path(os.environ.get("JAXFT_CACHE_DIR") or Path.home() / ".cache" / "jaxft")


def _cache_file(cache_dir: str | Path | None | bool, scheme: str, root: Path,
                key: dict[str, Any]) -> Path | None:
  if cache_dir is False:
    return None
  directory = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
  return directory.expanduser() / f"{scheme}-{root.name}-{digest}.npz"


def _read_cache(path: Path) -> Dataset | None:
  """The cached dataset, or None when missing or unreadable (it is then rewritten)."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      return Dataset(z["images"], z["labels"], tuple(str(c) for c in z["class_names"]),
                     int(z["skipped"]))
  except Exception as e:  # Any damage (truncation, bad zip, wrong arrays) means: decode again.
    logging.warning("ignoring unreadable cache file %s (%s); it will be rewritten", path, e)
    return None


def _write_cache(path: Path, ds: Dataset) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + os.replace so a crash or a concurrent reader never sees a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, images=ds.images, labels=ds.labels, class_names=np.asarray(ds.class_names, str),
                 skipped=np.int64(ds.skipped))
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    logging.warning("could not write data cache %s (%s); continuing without it", path, e)


# ---------------------------------------------------------------------------------------------------
# Validation split and deterministic batching
# ---------------------------------------------------------------------------------------------------


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
            num_steps: int | None = None, buffer_size: int = 2) -> Prefetcher:
  """Yields ``(step, images uint8 [B, H, W, 3], labels int32 [B])`` for steps ``start_step,
  start_step + 1, …`` (``num_steps`` of them, or forever), gathered by :func:`batch_indices` in a
  background thread.

  Args:
    ds: the training set; not mutated (batches are copies).
    batch_size: examples per step; the last partial batch of each epoch is dropped.
    seed: shuffling seed.
    start_step: the global step to start at (the resume point).
    num_steps: how many steps to yield; ``None`` for an endless stream.
    buffer_size: how many batches may be prepared ahead.

  Returns:
    A :class:`Prefetcher` (an iterator; close it, or use it in a ``with`` block, to stop early).

  Raises:
    DataError: bad ``batch_size``, raised here rather than from the background thread.
  """
  steps_per_epoch(len(ds), batch_size)
  _check_seed(seed)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  steps = itertools.count(start_step) if num_steps is None else range(start_step, start_step + num_steps)

  def produce(step: int) -> Batch:
    idx = np.sort(batch_indices(len(ds), batch_size, seed, step))
    # Sorting makes the gather cache-friendly; order inside a batch does not matter to training.
    return step, ds.images[idx], ds.labels[idx]

  return Prefetcher(produce, steps, buffer_size)


# ---------------------------------------------------------------------------------------------------
# On-device preprocessing (pure, jit-compatible)
# ---------------------------------------------------------------------------------------------------


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = jnp.float32) -> jax.Array:
  """``(images / 255 - mean) / std`` per channel, computed in float32 and returned as ``dtype``.

  Args:
    images: ``uint8 [..., C]`` (or float in 0–255); not mutated.
    mean, std: per-channel statistics in 0–1 units (e.g. ImageNet ``(0.485, 0.456, 0.406)``).
    dtype: output dtype.
  """
  x = jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)
  mean_ = jnp.asarray(mean, jnp.float32)
  std_ = jnp.asarray(std, jnp.float32)
  return ((x - mean_) / std_).astype(dtype)


def _resize(x: jax.Array, out_size: int | Sequence[int] | None) -> jax.Array:
  if out_size is None:
    return x
  h, w = _as_hw(out_size)
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear")


def augment(rng: jax.Array, images: jax.Array, *, mean: Sequence[float], std: Sequence[float],
            crop_padding: int = 4, flip: bool = True, out_size: int | Sequence[int] | None = None,
            dtype: Any = jnp.float32) -> jax.Array:
  """Training augmentation on device: per-example random crop and horizontal flip, optional resize,
  then :func:`normalize`.

  The crop pads each image by ``crop_padding`` pixels of value 0 (black, as torchvision's
  ``RandomCrop(padding=…)`` does before normalisation) and cuts an ``H × W`` window at a per-example
  random offset in ``[0, 2 * crop_padding]``. Each example is flipped with probability 1/2. All
  randomness comes from ``rng``; the train step should pass ``fold_in(rng, step)``.

  Args:
    rng: a PRNG key.
    images: ``uint8 [N, H, W, C]``; not mutated.
    mean, std: per-channel statistics in 0–1 units.
    crop_padding: padding for the random crop; 0 disables cropping.
    flip: random horizontal flips.
    out_size: resize (bilinear) to this size (int or ``(h, w)``) after cropping.
    dtype: output dtype.

  Returns:
    ``dtype [N, out_h, out_w, C]``.
  """
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  x = jnp.asarray(images)
  if crop_padding > 0:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * p + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    x = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
    x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
  x = _resize(x.astype(jnp.float32), out_size)
  return normalize(x, mean, std, dtype)


def preprocess_eval(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                    out_size: int | Sequence[int] | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """Evaluation preprocessing: optional bilinear resize to ``out_size`` then :func:`normalize`.

  Args:
    images: ``uint8 [N, H, W, C]``; not mutated.
    mean, std: per-channel statistics in 0–1 units.
    out_size: int or ``(h, w)``; ``None`` keeps the size.
    dtype: output dtype.

  Returns:
    ``dtype [N, out_h, out_w, C]``.
  """
  return normalize(_resize(jnp.asarray(images).astype(jnp.float32), out_size), mean, std, dtype)


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------


def describe(ds: Dataset) -> str:
  """A one-line summary: size, classes, image shape, per-class count range, skipped files."""
  counts = np.bincount(ds.labels, minlength=ds.num_classes)
  names = ", ".join(ds.class_names[:5]) + (", …" if ds.num_classes > 5 else "")
  shape = "x".join(map(str, ds.images.shape[1:]))
  per = f"{counts.min()}-{counts.max()} per class" if len(counts) else "no classes"
  skipped = f", {ds.skipped} skipped" if ds.skipped else ""
  return f"{len(ds)} images {shape}, {ds.num_classes} classes ({names}), {per}{skipped}"
