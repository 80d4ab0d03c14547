"""Random-access record sources for the stream: ArrayRecord files of encoded images
(``arrayrecord:DIR``) and TensorFlow Datasets through ``tfds.data_source`` (``tfds:NAME``), neither
importing TensorFlow.

``arrayrecord:DIR`` is jaxft's layout, written by :func:`write_arrayrecord`: ``DIR/<split>.array_record``
holds one record per example, the image file's bytes as they are (JPEG, PNG, …: decoded per step by
pillow, with JPEG draft decoding, exactly as the files would be), and ``DIR/<split>.json`` holds
``{"class_names": [...], "labels": [...]}`` (so that opening reads no image). The records are read by
``array_record``'s random-access data source, which pickles as its paths (grain's workers reopen it).

``tfds:NAME`` opens a prepared TFDS dataset (its ``array_record`` files, in ``data_dir`` or TFDS's
default) with ``tfds.data_source``: examples are decoded by TFDS when their batch is built, an
``image`` feature of any channel count becomes RGB, ``label`` is the class (its ``ClassLabel`` names).

Nothing here mutates its inputs or the files it reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxft.data.dataset import DataError

RECORDS_SUFFIX = ".array_record"


def _array_record() -> Any:
  try:
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError("arrayrecord: sources need array-record, which is not installed; "
                    "pip install 'jaxft[stream]' (or pip install array-record)") from None
  return array_record_data_source, array_record_module


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """Examples in an ArrayRecord file: record ``i`` is image ``i``'s encoded bytes.

  Attributes:
    path: the ``.array_record`` file. labels: ``int32 [N]``. class_names: label ``i`` is
    ``class_names[i]``. index: which records, in order (a subset keeps the file and picks records).
  """

  path: str
  labels: np.ndarray
  class_names: tuple[str, ...]
  index: np.ndarray
  skipped: tuple[tuple[str, str], ...] = ()

  def __post_init__(self) -> None:
    object.__setattr__(self, "_reader", None)

  def __getstate__(self) -> dict[str, Any]:  # the reader is reopened in each worker
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    for k, v in state.items():
      object.__setattr__(self, k, v)
    object.__setattr__(self, "_reader", None)

  def __len__(self) -> int:
    return len(self.index)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def item(self, i: int) -> tuple[bytes, int]:
    """``(encoded image bytes, label)`` of example ``i``."""
    if self._reader is None:
      source_cls, _ = _array_record()
      object.__setattr__(self, "_reader", source_cls.ArrayRecordDataSource([self.path]))
    return self._reader[int(self.index[i])], int(self.labels[i])

  def subset(self, indices: Sequence[int] | np.ndarray) -> RecordSource:
    """A new source of the examples at ``indices`` (``self`` is not mutated)."""
    idx = np.asarray(indices, np.int64)
    return RecordSource(self.path, self.labels[idx], self.class_names, self.index[idx], self.skipped)

  def fingerprint(self) -> dict[str, Any]:
    """Count, classes, and the sha256 of the file's path, size, mtime, the records taken and labels."""
    st = os.stat(self.path)
    h = hashlib.sha256(repr((self.path, st.st_size, st.st_mtime_ns)).encode())
    h.update(np.ascontiguousarray(self.index).data)
    h.update(np.ascontiguousarray(self.labels).data)
    return {"n": len(self), "class_names": list(self.class_names), "image_shape": None,
            "sha256": h.hexdigest()}


def write_arrayrecord(directory: str | Path, split: str, files: Sequence[str], labels: Sequence[int],
                      class_names: Sequence[str]) -> Path:
  """Writes ``directory/<split>.array_record`` (each file's bytes, in order) and ``<split>.json``.

  Returns:
    The ``.array_record`` path. The image files are not modified.

  Raises:
    DataError: labels and files of different lengths, or labels outside ``class_names``.
  """
  labels = [int(x) for x in labels]
  if len(labels) != len(files) or any(not 0 <= x < len(class_names) for x in labels):
    raise DataError(f"write_arrayrecord needs one label in [0, {len(class_names)}) per file; got "
                    f"{len(labels)} labels for {len(files)} files")
  _, module = _array_record()
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{split}{RECORDS_SUFFIX}"
  writer = module.ArrayRecordWriter(str(path), "group_size:1")  # one record per chunk: random access
  try:
    for f in files:
      writer.write(Path(f).read_bytes())
  finally:
    writer.close()
  (out / f"{split}.json").write_text(json.dumps({"class_names": list(class_names), "labels": labels}))
  return path


def open_arrayrecord(source: str, split: str = "train") -> RecordSource:
  """``arrayrecord:DIR`` → the examples of ``DIR/<split>.array_record`` with ``DIR/<split>.json``.

  Raises:
    DataError: a missing file, a label file that is not ``{"class_names", "labels"}``, or a record
      count that differs from the label count.
  """
  directory = Path(source.partition(":")[2]).expanduser()
  path, meta = directory / f"{split}{RECORDS_SUFFIX}", directory / f"{split}.json"
  for p in (path, meta):
    if not p.is_file():
      raise DataError(f"{source!r}: {str(p)!r} not found; an arrayrecord: directory holds "
                      f"<split>{RECORDS_SUFFIX} and <split>.json (write them with "
                      "jaxft.data.records.write_arrayrecord)")
  try:
    info = json.loads(meta.read_text())
    names, labels = tuple(str(c) for c in info["class_names"]), np.asarray(info["labels"], np.int32)
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{str(meta)!r} is not a label file ({type(e).__name__}: {e}); expected "
                    '{"class_names": [...], "labels": [...]}') from None
  if labels.ndim != 1 or (len(labels) and not 0 <= labels.min() <= labels.max() < len(names)):
    raise DataError(f"{str(meta)!r}: every label must be an index into its {len(names)} class_names")
  source_cls, _ = _array_record()
  n = len(source_cls.ArrayRecordDataSource([str(path)]))
  if n != len(labels):
    raise DataError(f"{str(path)!r} holds {n} records but {str(meta)!r} {len(labels)} labels; rewrite "
                    "them together")
  return RecordSource(str(path), labels, names, np.arange(n, dtype=np.int64))


# --- tfds ---------------------------------------------------------------------------------------------


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  return np.ascontiguousarray(image.astype(np.uint8, copy=False))


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TFDS split through ``tfds.data_source`` (random access, no TensorFlow): example ``i`` is
  decoded by TFDS when it is read. Attributes as :class:`RecordSource`; ``data`` is TFDS's source."""

  name: str
  split: str
  data: Any
  labels: np.ndarray
  class_names: tuple[str, ...]
  index: np.ndarray
  skipped: tuple[tuple[str, str], ...] = ()

  def __len__(self) -> int:
    return len(self.index)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def item(self, i: int) -> tuple[np.ndarray, int]:
    """``(uint8 [H, W, 3], label)`` of example ``i``."""
    return _rgb(self.data[int(self.index[i])]["image"]), int(self.labels[i])

  def subset(self, indices: Sequence[int] | np.ndarray) -> TfdsSource:
    idx = np.asarray(indices, np.int64)
    return dataclasses.replace(self, labels=self.labels[idx], index=self.index[idx])

  def fingerprint(self) -> dict[str, Any]:
    h = hashlib.sha256(repr((self.name, self.split)).encode())
    h.update(np.ascontiguousarray(self.index).data)
    h.update(np.ascontiguousarray(self.labels).data)
    return {"n": len(self), "class_names": list(self.class_names), "image_shape": None,
            "sha256": h.hexdigest()}


def open_tfds(source: str, split: str = "train", data_dir: str | None = None) -> TfdsSource:
  """``tfds:NAME`` → the split through ``tfds.data_source`` (the dataset must be prepared in
  ``array_record`` format; nothing is downloaded). Reads every label once (TFDS decodes each example).

  Raises:
    DataError: tensorflow_datasets missing, a dataset TFDS cannot open, or one without ``image`` and
      ``label`` features.
  """
  name = source.partition(":")[2]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional, heavy)
  except ImportError:
    raise DataError(f"source {source!r} needs tensorflow_datasets, which is not installed; "
                    "pip install 'jaxft[tfds]'") from None
  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises many types for a dataset it cannot find or open
    raise DataError(f"tfds.data_source cannot open {source!r} split {split!r} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); prepare it in array_record format "
                    "first (tfds build --file_format=array_record)") from None
  features = data.dataset_info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"{source!r} has features {sorted(features)}; expected 'image' and 'label'")
  label = features["label"]
  names = tuple(getattr(label, "names", None) or (str(i) for i in range(label.num_classes)))
  labels = np.asarray([int(data[i]["label"]) for i in range(len(data))], np.int32)
  return TfdsSource(name, split, data, labels, names, np.arange(len(labels), dtype=np.int64))

