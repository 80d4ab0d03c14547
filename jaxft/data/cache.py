"""The on-disk cache of decoded datasets: one ``.npz`` per (source, listing, options) key."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxft.data.dataset import Dataset, describe

# Bumped whenever the cached arrays would differ for the same inputs (decoding or key changes).
CACHE_VERSION = 1


def default_cache_dir() -> Path:
  """``$JAXFT_CACHE_DIR`` or ``~/.cache/jaxft``."""
  return Path(os.environ.get("JAXFT_CACHE_DIR") or Path.home() / ".cache" / "jaxft")


def file_stat(f: Path) -> tuple[int, int]:
  """``(size, mtime_ns)`` of ``f``: what a cache key records of each input file."""
  st = f.stat()
  return st.st_size, st.st_mtime_ns


def cache_file(cache_dir: str | Path | None | bool, scheme: str, root: Path,
               key: dict[str, Any]) -> Path | None:
  """Where the dataset described by ``key`` (JSON-able) is cached, or None when ``cache_dir`` is False.

  ``cache_dir`` None or True means :func:`default_cache_dir`. Nothing is created.
  """
  if cache_dir is False:
    return None
  directory = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
  return directory.expanduser() / f"{scheme}-{root.name}-{digest}.npz"


def read_cache(path: Path) -> Dataset | None:
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


def write_cache(path: Path, ds: Dataset) -> None:
  """Writes ``ds`` to ``path`` atomically; a failure to write is logged, never raised."""
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


def load_cached(path: Path | None, load: Callable[[], Dataset], source: str) -> Dataset:
  """The dataset cached at ``path`` when valid, else ``load()`` (then cached at ``path``).

  Args:
    path: from :func:`cache_file`; None runs ``load()`` and caches nothing.
    load: decodes the dataset.
    source: the source string, for the log.
  """
  if path is not None:
    ds = read_cache(path)
    if ds is not None:
      logging.info("loaded %s from cache %s", source, path)
      return ds
  start = time.perf_counter()
  ds = load()
  logging.info("decoded %s: %s in %.1fs", source, describe(ds), time.perf_counter() - start)
  if path is not None:
    write_cache(path, ds)
  return ds
