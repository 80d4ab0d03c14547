"""The stream's in-memory fast path: a folder's images decoded once, at their own size, into one cache
file that this process and every grain worker map (the OS page cache holds the pixels once).

A :class:`DecodedSource` gives the stream's transforms the very pixels a file would give them, so the
batches are the same bit for bit as streaming the files (tested): an image is decoded at full size
and handed over as an array, and the transforms resample it exactly as they resample a decoded file.
The one difference would be JPEG draft decoding (:mod:`jaxft.data.host_transforms` decodes a JPEG at
1/2, 1/4 or 1/8 scale when the crop is large): it can only shrink an image whose both sides are at
least twice the output size, so those images (:func:`may_draft`) are not decoded here: their paths
stay, and they are decoded per step as the stream does.

Why a mapped file rather than an array in this process: grain sends its pipeline to every worker
process by pickling it, which would copy the pixels into each; a path and offsets pickle in bytes, and
the mapping shares one copy. The file is written atomically under a key of every path, size, mtime and
the output size, in the cache directory, so a rerun or resume maps it without decoding.

Nothing here mutates its inputs or the image files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxft.data import cache, decode, host_transforms
from jaxft.data.dataset import DataError

DECODE_VERSION = 1  # bump when what is stored for the same files changes


def may_draft(sizes: np.ndarray, size: int) -> np.ndarray:
  """``bool [N]``: which images (``sizes`` ``int [N, 2]``, width and height) JPEG draft decoding could
  shrink for ``size`` px outputs: both sides at least ``2 * size`` (a smaller side keeps the DCT scale
  at 1 for every crop box, see :func:`jaxft.data.host_transforms._crop_resize`)."""
  sizes = np.asarray(sizes).reshape(-1, 2)
  return np.minimum(sizes[:, 0], sizes[:, 1]) >= 2 * size


def decoded_bytes(sizes: np.ndarray, size: int, draft: bool = True) -> int:
  """The bytes :func:`decode_source` would hold for images of ``sizes`` (``[N, 2]``, width and height)
  and ``size`` px outputs: ``3 * w * h`` of every image draft decoding cannot shrink (all when
  ``draft`` is off)."""
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  keep = ~may_draft(sizes, size) if draft else np.ones(len(sizes), bool)
  return int(3 * np.sum(sizes[keep, 0] * sizes[keep, 1]))


class PixelStore:
  """Decoded images, concatenated in one file: image ``i`` is ``uint8 [h_i, w_i, 3]`` at ``offsets[i]``
  (``-1``: not stored). Pickles as its path and offsets; each process maps the file on first use."""

  def __init__(self, path: str, offsets: np.ndarray, sizes: np.ndarray):
    self.path, self.offsets, self.sizes = str(path), np.asarray(offsets, np.int64), np.asarray(sizes)
    self._map: np.ndarray | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self.path, "offsets": self.offsets, "sizes": self.sizes}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], state["offsets"], state["sizes"])

  def __len__(self) -> int:
    return len(self.offsets)

  def image(self, i: int) -> np.ndarray | None:
    """A read-only view of image ``i``, or None when it is not stored."""
    start = int(self.offsets[i])
    if start < 0:
      return None
    if self._map is None:
      self._map = np.memmap(self.path, np.uint8, mode="r")
    w, h = (int(v) for v in self.sizes[i])
    return self._map[start:start + h * w * 3].reshape(h, w, 3)

  def subset(self, idx: np.ndarray) -> PixelStore:
    """The store of the images at ``idx`` (the same file; ``self`` is not mutated)."""
    return PixelStore(self.path, self.offsets[idx], self.sizes[idx])


@dataclasses.dataclass(frozen=True)
class DecodedSource:
  """A :class:`~jaxft.data.stream.FileSource` with its images held decoded (a :class:`PixelStore`).

  ``item(i)`` is the decoded array, or the path for an image kept as a file; everything else (labels,
  class names, skipped files, the fingerprint a workdir records) is the file source's, so a run that
  switches between the two paths sees the same data.
  """

  files: Any  # jaxft.data.stream.FileSource
  store: PixelStore

  def __len__(self) -> int:
    return len(self.files)

  def item(self, i: int) -> tuple[host_transforms.ImageInput, int]:
    """``(uint8 [H, W, 3] or path, label)`` of example ``i``."""
    pixels = self.store.image(i)
    return (self.files.paths[i] if pixels is None else pixels), int(self.files.labels[i])

  @property
  def labels(self) -> np.ndarray:
    return self.files.labels

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.files.class_names

  @property
  def skipped(self) -> tuple[tuple[str, str], ...]:
    return self.files.skipped

  @property
  def num_classes(self) -> int:
    return self.files.num_classes

  def subset(self, indices: Sequence[int] | np.ndarray) -> DecodedSource:
    """A new source of the examples at ``indices``, in that order (``self`` is not mutated)."""
    idx = np.asarray(indices, np.int64)
    return DecodedSource(self.files.subset(idx), self.store.subset(idx))

  def fingerprint(self) -> dict[str, Any]:
    """The file source's (the pixels are not hashed)."""
    return self.files.fingerprint()


def _decode_full(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(decode.to_rgb(im), dtype=np.uint8)


def _write_store(paths: list[str], where: Path, num_workers: int) -> None:
  """Decodes ``paths`` in order (grain threads, and worker processes for long lists) into ``where``."""
  from jaxft.data import stream  # pylint: disable=g-import-not-at-top  (imports grain)

  grain = stream._grain()  # pylint: disable=protected-access
  ds = grain.MapDataset.source(paths).map(_decode_full)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  if num_workers > 0 and len(paths) >= stream.SCAN_POOL_MIN_FILES:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    stream._let_grain_read_its_flag()  # pylint: disable=protected-access
  where.parent.mkdir(parents=True, exist_ok=True)
  tmp = where.with_name(where.name + f".tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      for pixels in it:
        f.write(np.ascontiguousarray(pixels).data)
    os.replace(tmp, where)  # atomic: a reader maps the old file or the whole new one
  finally:
    tmp.unlink(missing_ok=True)


def decode_source(files: Any, size: int, *, cache_dir: str | Path | None = None, draft: bool = True,
                  num_workers: int = 0) -> DecodedSource:
  """``files`` (a :class:`~jaxft.data.stream.FileSource` from ``open_folder``, which knows each image's
  size) with every image that draft decoding cannot shrink at ``size`` px decoded into the cache
  directory (``None``: ``$JAXFT_CACHE_DIR`` or ``~/.cache/jaxft``), or mapped from there when an
  earlier run wrote it.

  Returns:
    A new :class:`DecodedSource`; ``files`` and the image files are not modified.

  Raises:
    DataError: a source without image sizes, or a file that no longer decodes (naming it).
  """
  if getattr(files, "sizes", None) is None:
    raise DataError("decode_source needs a FileSource listed by open_folder (it records image sizes)")
  sizes = np.asarray(files.sizes, np.int64).reshape(-1, 2)
  keep = ~may_draft(sizes, size) if draft else np.ones(len(sizes), bool)
  nbytes = 3 * sizes[:, 0] * sizes[:, 1] * keep
  offsets = np.where(keep, np.cumsum(nbytes) - nbytes, -1)
  fp = files.fingerprint()
  root = Path(files.paths[0]).parent.parent if len(files) else Path("empty")
  key = {"version": DECODE_VERSION, "files": fp["sha256"], "n": fp["n"], "keep": int(keep.sum()),
         "min_drafted": 2 * size if draft else None}
  where = cache.cache_file(cache_dir, "decoded", root, key)
  if where is None:
    raise DataError("decode_source writes the decoded images to the cache directory; cache_dir=False "
                    "turns that off: stream the files instead")
  where = where.with_suffix(".u8")
  total = int(nbytes.sum())
  if not (where.is_file() and where.stat().st_size == total):
    kept = [p for p, k in zip(files.paths, keep) if k]
    logging.info("decoding %d images (%.0f MiB) once into %s", len(kept), total / 2**20, where)
    try:
      _write_store(kept, where, num_workers)
    except decode._DECODE_ERRORS as e:  # pylint: disable=protected-access
      raise DataError(f"an image under {str(root)!r} no longer decodes ({type(e).__name__}: {e}); it "
                      "changed after it was checked: rerun, which checks the folder again") from None
    if where.stat().st_size != total:
      where.unlink(missing_ok=True)
      raise DataError(f"the images under {str(root)!r} decode to other sizes than when they were checked;"
                      " a file changed: rerun, which checks the folder again")
  return DecodedSource(files, PixelStore(str(where), offsets, sizes))
