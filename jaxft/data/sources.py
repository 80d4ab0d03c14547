"""Data sources: where images come from, decoded into a :class:`~jaxft.data.dataset.Dataset`.

A source string names where images come from:

* ``folder:PATH`` — one sub-folder per class (sorted folder names give the label order); image files
  inside are decoded with pillow and converted to RGB.
* ``cifar:PATH`` — the standard CIFAR-10 python archive (``cifar-10-python.tar.gz``) or its extracted
  ``cifar-10-batches-py`` folder; ``split`` is ``train`` or ``test``.
* ``tfds:NAME`` — a TensorFlow Datasets dataset (needs ``pip install jaxft[tfds]``).
* ``arrayrecord:DIR`` — ArrayRecord files of encoded images (:mod:`jaxft.data.records`); streamed only
  (``data.pipeline = 'stream'`` or ``'auto'``).
* ``sklearn:digits`` — scikit-learn's bundled handwritten digits (1,797 8×8 grey images, 10 classes; no
  download), upscaled to 32×32 RGB unless ``image_size`` says otherwise. ``split`` is ``train`` (the
  first 1,347), ``test`` (the last 450: other writers than most of ``train``) or ``all``.

``folder`` and ``cifar`` loads go through the disk cache (:mod:`jaxft.data.cache`). Files on disk are
never modified.
"""

from __future__ import annotations

import functools
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxft import safe_pickle
from jaxft.data import cache, decode
from jaxft.data.dataset import DataError, Dataset

SCHEMES = ("folder", "cifar", "tfds", "sklearn", "arrayrecord")
STREAM_ONLY = ("arrayrecord",)  # read by the streaming pipeline only (jaxft.data.records)
NAMED_SCHEMES = ("tfds", "sklearn")  # sources that name a dataset rather than a path
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm"})
# Folder names that mark ``PATH/<split>/<class>/`` layouts (see ``_folder_root``).
SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})


def load_source(source: str, *, split: str = "train", image_size: int | None = None,
                limit: int | None = None, skip_corrupt: bool = False,
                cache_dir: str | Path | None | bool = None) -> Dataset:
  """Loads a whole split of ``source`` into memory, using the disk cache when it is valid.

  Args:
    source: ``folder:PATH``, ``cifar:PATH``, ``tfds:NAME`` or ``sklearn:NAME`` (see the module
      docstring). A ``folder``
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
      ``~/.cache/jaxft``; ``False`` disables the cache. ``tfds`` sources are not cached (TFDS caches),
      nor ``sklearn`` ones (decoded in milliseconds).

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
  if scheme in STREAM_ONLY:
    raise DataError(f"source {source!r} is read by the streaming pipeline only; set "
                    "data.pipeline='stream' (or 'auto'), or use jaxft.data.stream.open_source")
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
    fingerprint: Any = [[str(f.relative_to(root)), *cache.file_stat(f)] for f, _ in files]
    load = functools.partial(_load_folder, root, class_names, files, image_size, skip_corrupt)
  else:
    cifar = _cifar_location(path)
    fingerprint = _cifar_fingerprint(cifar)
    load = functools.partial(_load_cifar, cifar, split, image_size, limit)
    root = cifar

  key = {"version": cache.CACHE_VERSION, "source": source, "path": str(root), "listing": fingerprint,
         "split": split, "image_size": image_size, "skip_corrupt": skip_corrupt, "limit": limit}
  return cache.load_cached(cache.cache_file(cache_dir, scheme, root, key), load, source)


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
  listed = [sorted(f for f in c.iterdir() if f.is_file() and not f.name.startswith(".")) for c in classes]
  per_class = [[f for f in fs if f.suffix.lower() in IMAGE_EXTENSIONS] for fs in listed]
  others = [f for fs in listed for f in fs if f.suffix.lower() not in IMAGE_EXTENSIONS]
  if others:  # counted, so that nothing is lost silently
    logging.warning("ignored %d file(s) without an image extension under %s, first: %s", len(others),
                    root, ", ".join(str(f) for f in others[:5]))
  if not any(per_class):
    raise DataError(f"folder {str(root)!r} holds no image files (extensions "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}) in its class sub-folders")
  empty = [c.name for c, fs in zip(classes, per_class) if not fs]
  if empty:
    raise DataError(f"class folder(s) {empty} under {str(root)!r} hold no image files (extensions "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder(s)")
  if limit is None:
    files = [(f, label) for label, fs in enumerate(per_class) for f in fs]
  else:
    # Round-robin so a small limit still covers every class; then label order for locality.
    order = [(i, label, f) for label, fs in enumerate(per_class) for i, f in enumerate(fs)]
    order.sort(key=lambda t: (t[0], t[1]))
    files = [(f, label) for _, label, f in sorted(order[:limit], key=lambda t: (t[1], t[0]))]
  return tuple(c.name for c in classes), files




def _load_folder(root: Path, class_names: tuple[str, ...], files: list[tuple[Path, int]],
                 image_size: int | None, skip_corrupt: bool) -> Dataset:
  decoded = decode.decode_files([f for f, _ in files], image_size)
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
    return [loc.name, *cache.file_stat(loc)]
  return [[f.name, *cache.file_stat(f)] for f in sorted(loc.iterdir()) if f.is_file()]


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
  # The CIFAR python format *is* a pickle: read through the restricted unpickler (numpy arrays and plain
  # values only), so a crafted archive cannot run code.
  try:
    d = safe_pickle.loads(blob, safe_pickle.PLAIN_DATA, encoding="bytes")
  except safe_pickle.UnsafePickleError as e:
    raise DataError(f"refusing {name} in {str(loc)!r}: {e}; a CIFAR-10 python batch holds only numpy "
                    "arrays, lists and strings: use the archive from "
                    "https://www.cs.toronto.edu/~kriz/cifar.html") from None
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
    imgs = decode.resize_all(imgs, image_size)
  return Dataset(np.ascontiguousarray(imgs), labs, class_names)



# --- tfds -------------------------------------------------------------------------------------------


def _load_tfds(name: str, *, split: str, image_size: int | None, limit: int | None) -> Dataset:
  try:
    import tensorflow_datasets as tfds  # Heavy and optional: imported only when asked for.
  except ImportError:
    raise DataError(f"source 'tfds:{name}' needs tensorflow_datasets, which is not installed; "
                    "pip install jaxft[tfds-tf] (or stream it without TensorFlow: jaxft[tfds] and "
                    "data.pipeline='stream')") from None
  tfds_split = split if limit is None else f"{split}[:{limit}]"
  try:
    data, info = tfds.load(name, split=tfds_split, batch_size=-1, with_info=True)
  except ModuleNotFoundError as e:  # tfds.load builds a tf.data pipeline: TensorFlow
    raise DataError(f"source 'tfds:{name}' in memory needs {e.name or 'tensorflow'} (tfds.load); pip "
                    "install jaxft[tfds-tf], or stream it without TensorFlow: data.pipeline='stream'"
                    ) from None
  data = tfds.as_numpy(data)
  if "image" not in data or "label" not in data:
    raise DataError(f"tfds:{name} has features {sorted(data)}; expected 'image' and 'label'")
  images = np.asarray(data["image"], np.uint8)
  if images.ndim == 3 or images.shape[-1] == 1:  # grayscale → RGB
    images = np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=-1)
  if image_size is not None and images.shape[1:3] != (image_size, image_size):
    images = decode.resize_all(images, image_size)
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
  images = decode.resize_all(images, image_size or 32)
  labels = np.asarray(digits.target[parts[split]][:limit], np.int32)
  return Dataset(np.ascontiguousarray(images), labels, tuple(str(i) for i in range(10)))

