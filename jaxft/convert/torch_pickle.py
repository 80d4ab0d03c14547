"""Reading torch pickles (``.pth/.pt/.th``), without torch whenever the file holds only tensors.

torch.save writes a pickle in which each tensor is ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, …)`` and each storage is a *persistent id* ``('storage', torch.FloatStorage, key,
location, numel[, view])`` whose bytes live outside the pickle: in the zip entry ``<root>/data/<key>``
(torch >= 1.6) or, in the legacy format, after the pickle as ``int64 numel`` + raw bytes per key. The
reader here resolves only those few globals, so unlike ``pickle.load`` it cannot run code from the
file; anything else makes it refuse, and :func:`load_torch` falls back to torch, when installed.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxft.convert.errors import ConversionError

log = logging.getLogger(__name__)

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
# torch's legacy (pre-zip) format starts with this pickled magic number, then protocol 1001.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Refused(pickle.UnpicklingError):
  """The file needs a global outside the allow-list (or is in an unknown layout)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    if self.name == "BFloat16Storage":
      import ml_dtypes  # installed with jax
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _Storage:
  key: str
  dtype: np.dtype
  numel: int
  view: tuple[str, int, int] | None = None  # legacy views: (view key, element offset, view numel)
  array: np.ndarray | None = None  # filled once the bytes are read


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def materialise(self) -> np.ndarray:
    data = self.storage.array
    if data is None:
      raise _Refused(f"no bytes were found for storage {self.storage.key}")
    if self.storage.view is not None:
      _, start, n = self.storage.view
      data = data[start:start + n]
    n_needed = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) + 1
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, data.dtype)
    if n_needed > data.size:
      raise _Refused(f"tensor of size {self.size} runs past its storage ({data.size} elements)")
    item = data.itemsize
    # A copy: the result must not alias the file's buffer.
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=tuple(st * item for st in self.stride)).copy()


def _rebuild_tensor_v2(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _LazyTensor:
  del requires_grad, backward_hooks, metadata  # irrelevant to the values
  return _LazyTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _LazyTensor, requires_grad: bool = False, backward_hooks: Any = None
                       ) -> _LazyTensor:
  del requires_grad, backward_hooks
  return data


class _TensorUnpickler(pickle.Unpickler):
  """An unpickler that knows only torch's tensor/storage globals and ``OrderedDict``."""

  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file: Any, storages: dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise _Refused(f"the pickle needs {module}.{name}, which the torch-free reader does not load")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise _Refused(f"unknown persistent id {str(pid)[:80]}")
    _, stype, key, _, numel = pid[:5]
    view = pid[5] if len(pid) > 5 else None
    st = self.storages.get(str(key))
    if st is None:
      st = self.storages[str(key)] = _Storage(str(key), stype.dtype, int(numel))
    if view is not None:  # a legacy view shares the root's bytes
      return _Storage(str(key), stype.dtype, int(numel), (str(view[0]), int(view[1]), int(view[2])))
    return st


def _materialise(obj: Any, storages: dict[str, _Storage]) -> Any:
  if isinstance(obj, _LazyTensor):
    if obj.storage.view is not None:
      obj = dataclasses.replace(obj, storage=dataclasses.replace(
          obj.storage, array=storages[obj.storage.key].array))
    return obj.materialise()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages) for v in obj)
  return obj


def _read_zip(path: Path) -> Any:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise _Refused(f"{path.name} is a zip without exactly one data.pkl")
    root = pkl[0][:-len("data.pkl")]
    order = "<"
    if f"{root}byteorder" in names and z.read(f"{root}byteorder").strip() == b"big":
      order = ">"
    storages: dict[str, _Storage] = {}
    obj = _TensorUnpickler(io.BytesIO(z.read(pkl[0])), storages).load()
    for key, st in storages.items():
      raw = z.read(f"{root}data/{key}")
      st.array = np.frombuffer(raw, st.dtype.newbyteorder(order), count=st.numel)
  return _materialise(obj, storages)


def _read_legacy(path: Path) -> Any:
  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)  # plain ints: no globals involved
    except Exception as e:  # noqa: BLE001 — any garbage raises something
      raise _Refused(f"not a torch file: {e}") from None
    if magic != _LEGACY_MAGIC:
      raise _Refused("not a torch legacy-format file")
    if pickle.load(f) != 1001:
      raise _Refused("unknown torch legacy protocol")
    sys_info = _TensorUnpickler(f, {}).load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    storages: dict[str, _Storage] = {}
    obj = _TensorUnpickler(f, storages).load()
    keys = _TensorUnpickler(f, {}).load()
    order = "<" if little else ">"
    for key in keys:
      st = storages[str(key)]
      numel = int(np.frombuffer(f.read(8), order + "i8")[0])
      raw = f.read(numel * st.dtype.itemsize)
      if len(raw) != numel * st.dtype.itemsize:
        raise ConversionError(f"{path} is truncated (storage {key} is incomplete)")
      st.array = np.frombuffer(raw, st.dtype.newbyteorder(order))
  return _materialise(obj, storages)


def read_torch_file(path: str | os.PathLike) -> Any:
  """Reads a torch ``.pth`` (zip or legacy format) holding tensors in dicts/lists, without torch.

  Only ``OrderedDict``, torch's tensor-rebuild functions and storage types are resolved, so the file
  cannot run code; tensors come back as numpy arrays (copies, with their dtype, offset and strides).

  Args:
    path: the file; only read.

  Returns:
    The unpickled object with numpy arrays in place of tensors.

  Raises:
    pickle.UnpicklingError: when the file needs anything else (e.g. a pickled ``argparse.Namespace``) or
      is not in a torch format; torch itself can then read it, given ``weights_only=False`` for trusted
      files.
    ConversionError: for a truncated file.
  """
  path = Path(path)
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except (EOFError, zipfile.BadZipFile, KeyError, ValueError, pickle.UnpicklingError) as e:
    if isinstance(e, (ConversionError, _Refused)):
      raise
    raise ConversionError(f"{path} is not a readable PyTorch weights file (truncated?): "
                          f"{type(e).__name__}: {e}") from None


def load_torch(path: Path) -> Any:
  """Reads a torch pickle: with :func:`read_torch_file` when it holds only tensors, else with torch.

  Raises:
    ConversionError: torch is needed but not installed, or the file is not a readable torch file.
  """
  # The restricted reader first: it needs no torch (which is big and slow to import) and runs no code.
  try:
    return read_torch_file(path)
  except _Refused as e:
    refused = e
  try:
    import torch  # lazily: safetensors and already-converted models need no torch
  except ImportError:
    raise ConversionError(
        f"reading {path.name} needs PyTorch (pip install torch): {refused}; or convert it to .safetensors "
        "elsewhere") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 — torch raises many types for a bad or old file
    first = e
  # Old pickles (e.g. containing numpy scalars or argparse objects) are refused by weights_only=True.
  # Unpickling them may run code from the file, so say so.
  log.warning("%s is not loadable with weights_only=True (%s: %s); retrying with weights_only=False — "
              "only do this for files you trust", path.name, type(first).__name__,
              str(first).splitlines()[0] if str(first) else "")
  try:
    return torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # noqa: BLE001
    raise ConversionError(
        f"{path} is not a readable PyTorch weights file (truncated or not a checkpoint?): "
        f"{type(e).__name__}: {e}") from None
