"""Host-side image decoding with pillow: one file, a list of files (in worker processes when long), and
resizing of already-decoded arrays.

This module imports only numpy, pillow and :mod:`jaxft.safe_pickle`, so that a decode worker
(``python -m jaxft.data.decode``, run by :func:`decode_files`) starts without loading JAX.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import site
import subprocess
import sys
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from jaxft import safe_pickle

# One entry per file: the pixels, or the file and why it could not be decoded.
Decoded = Union[np.ndarray, tuple[Path, Exception]]

# Below this many files starting workers costs more than it saves.
POOL_MIN_FILES = 4096
MAX_WORKERS = 16
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# 16-bit greyscale as pillow opens it (PNG/TIFF ``I;16*``; 16-bit PGM and older pillows give ``I``, values
# scaled to 0..65535); ``convert("RGB")`` would clip these to 255, i.e. white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(im: Image.Image) -> Image.Image:
  """Returns ``im`` as an 8-bit RGB image (``im`` itself when it is one already; never modified).

  16-bit greyscale is scaled by 1/257 (rounded), so 65535 → 255; every other mode goes through pillow's
  ``convert("RGB")`` (greyscale/``1`` replicated, palette looked up, alpha dropped, CMYK/YCbCr/LAB/HSV
  converted; premultiplied ``La`` via ``LA``).

  Raises:
    ValueError: for 32-bit float images (``F``: no defined range) and ``I`` images outside 0..65535.
  """
  if im.mode == "RGB":
    return im
  if im.mode in _SIXTEEN_BIT_MODES:
    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ValueError(f"a 32-bit integer image (values {a.min()}..{a.max()}) has no 8-bit equivalent")
    return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")
  if im.mode == "F":
    raise ValueError("a 32-bit float image (pillow mode F) has no defined range; save it as 8 or 16 bits")
  if im.mode == "La":  # pillow converts premultiplied grey+alpha only to LA
    im = im.convert("LA")
  return im.convert("RGB")


def decode_image(path: Path, image_size: int | None) -> np.ndarray:
  """Decodes one file to ``uint8 [H, W, 3]`` (RGB, see :func:`to_rgb`; resized bilinearly to a square
  when ``image_size``).

  Raises:
    OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError: the file is not a readable image.
  """
  with Image.open(path) as im:
    im = to_rgb(im)
    if image_size is not None and im.size != (image_size, image_size):
      im = im.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_in_process(paths: Sequence[Path], image_size: int | None) -> list[Decoded]:
  """:func:`decode_image` of each path in this process, in order; an unreadable file gives
  ``(path, exception)`` instead of raising."""
  out: list[Decoded] = []
  for p in paths:
    try:
      out.append(decode_image(p, image_size))
    except _DECODE_ERRORS as e:
      out.append((p, e))
  return out


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
  """A new ``uint8 [N, size, size, 3]``: each of ``images`` (``uint8 [N, H, W, 3]``, not mutated) resized
  bilinearly with pillow, as :func:`decode_image` resizes."""
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                   for im in images])


def num_workers() -> int:
  """The CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def decode_files(paths: Sequence[Path], image_size: int | None) -> list[Decoded]:
  """Decodes ``paths`` in order, like :func:`decode_in_process`, in worker processes when there are at
  least ``POOL_MIN_FILES`` of them and two or more CPUs (one contiguous share per worker, at most
  ``MAX_WORKERS``).

  Threads do not help: for small JPEGs most of pillow's time is Python (header parsing), not the GIL-free
  decode. Workers are ``python -m jaxft.data.decode`` subprocesses rather than ``multiprocessing``:
  forking a process that runs JAX's threads can deadlock, and ``spawn``/``forkserver`` re-import the
  caller's ``__main__`` (breaking unguarded scripts, and loading JAX in every worker). If a worker
  fails, the files are decoded in this process instead.

  Returns:
    One :data:`Decoded` per path, in the order of ``paths``. No file is modified.
  """
  workers = min(num_workers(), MAX_WORKERS)
  if workers < 2 or len(paths) < POOL_MIN_FILES:
    return decode_in_process(paths, image_size)
  try:
    return decode_in_workers(paths, image_size, workers)
  except (OSError, RuntimeError, pickle.UnpicklingError) as e:
    logging.warning("decode workers failed (%s); decoding in this process", e)
    return decode_in_process(paths, image_size)


def decode_in_workers(paths: Sequence[Path], image_size: int | None, workers: int) -> list[Decoded]:
  """:func:`decode_in_process` split into ``workers`` contiguous shares, each decoded by its own worker
  subprocess; the shares are joined back in order.

  Raises:
    RuntimeError: a worker exited with an error (its stderr is in the message).
    OSError: a worker could not be started.
  """
  share = -(-len(paths) // workers)
  parts = [list(paths[i:i + share]) for i in range(0, len(paths), share)]
  with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:  # threads only wait on processes
    return [r for rs in pool.map(lambda part: _run_worker(part, image_size), parts) for r in rs]


def _worker_env() -> dict[str, str]:
  # The worker must import this very copy of jaxft, also from a source checkout that is not installed;
  # an installed copy is found anyway (and site-packages ahead of the standard library could shadow it).
  root = os.path.realpath(Path(__file__).parents[2])
  env = dict(os.environ)
  installed = {os.path.realpath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
  if root not in installed:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  return env


def _run_worker(part: list[Path], image_size: int | None) -> list[Decoded]:
  # Only plain values cross the pipe (paths as str), read back through the restricted unpickler.
  proc = subprocess.run([sys.executable, "-m", "jaxft.data.decode"],
                        input=pickle.dumps(([str(p) for p in part], image_size)), capture_output=True,
                        env=_worker_env())
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr.decode(errors="replace")[-2000:])
  out = safe_pickle.loads(proc.stdout, safe_pickle.PLAIN_DATA)
  if isinstance(out, np.ndarray):
    return list(out)
  return [r if isinstance(r, np.ndarray) else (p, OSError(r[1])) for p, r in zip(part, out)]


def _worker_main() -> None:
  """Reads pickled ``(paths as str, image_size)`` from stdin, writes the pickled decodes to stdout."""
  paths, image_size = safe_pickle.loads(sys.stdin.buffer.read(), {})
  decoded = decode_in_process([Path(p) for p in paths], image_size)
  out: np.ndarray | list[np.ndarray | tuple[str, str]]
  if decoded and all(isinstance(r, np.ndarray) and r.shape == decoded[0].shape for r in decoded):
    out = np.stack(decoded)  # one array pickles far faster than thousands of small ones
  else:  # exceptions travel as their message: not every exception type pickles
    out = [r if isinstance(r, np.ndarray) else (str(r[0]), str(r[1])) for r in decoded]
  pickle.dump(out, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
  _worker_main()
