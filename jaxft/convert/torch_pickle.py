"""Reading torch pickles (``.pth/.pt/.th``) through :mod:`jaxft.safe_pickle`: tensors without torch, and
nothing that runs code unless the caller trusts the file.

torch.save writes a pickle in which each tensor is ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, …)`` and each storage is a *persistent id* ``('storage', torch.FloatStorage, key,
location, numel[, view])`` whose bytes live outside the pickle: in the zip entry ``<root>/data/<key>``
(torch >= 1.6) or, in the legacy format, after the pickle as ``int64 numel`` + raw bytes per key. The
reader resolves only those globals (with stand-ins that check their arguments), ``OrderedDict``, plain
builtins and numpy scalars; a file that needs anything else is refused, naming the global. torch itself
is then asked with ``weights_only=True`` only — ``weights_only=False`` (which runs the file's code) only
when the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxft import safe_pickle
from jaxft.convert.errors import ConversionError
from jaxft.safe_pickle import Placeholder, UnsafePickleError, shown

log = logging.getLogger(__name__)

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}
# torch's legacy (pre-zip) format starts with this pickled magic number, then protocol 1001.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Tensors may view their storages more than once (tied weights), but a small file must not expand into
# an unbounded amount of memory: at most this many times its storage bytes (plus a slack) are copied out.
_EXPANSION = 8
_SLACK = 64 << 20
# torch.load(weights_only=True) could run code before 2.6 (CVE-2025-32434); older versions are not asked.
_SAFE_TORCH = (2, 6)
_TRUST_HINT = ("If you made this file yourself, pass trust_pickle=True (tools/convert_torch_weights.py "
               "--trust-pickle), which runs code from the file; otherwise re-save only its tensors "
               "(torch.save(model.state_dict(), …) or .safetensors) where running it is safe")


class _StorageType(Placeholder):
  """``torch.FloatStorage`` & co. in a persistent id."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    if self.name == "BFloat16Storage":
      import ml_dtypes  # installed with jax
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_STORAGE_DTYPES[self.name])


class _Storage(Placeholder):
  """``numel`` elements from ``start`` of the storage ``key`` (a legacy view when ``start`` > 0)."""

  __slots__ = ("data", "key", "start", "numel", "dtype")

  def __init__(self, data: _Bytes, key: str, start: int, numel: int, dtype: np.dtype):
    self.data, self.key, self.start, self.numel, self.dtype = data, key, start, numel, dtype


class _Bytes:
  """The storages one file declares and, once read, their bytes. Only the reader holds it (pickles
  cannot reach it: they get :class:`_Storage` placeholders, which have no attribute access)."""

  def __init__(self):
    self.declared: dict[str, tuple[np.dtype, int]] = {}
    self.arrays: dict[str, np.ndarray] = {}
    self.budget = _SLACK

  def persistent_load(self, pid: Any) -> _Storage:
    """The storage a persistent id names (the ``persistent_load`` of the tensor pickle)."""
    if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int
            and pid[4] >= 0):
      raise UnsafePickleError(f"unknown persistent id {shown(pid)}")
    key, numel, dt = pid[2], pid[4], pid[1].dtype
    if self.declared.setdefault(key, (dt, numel)) != (dt, numel):
      raise pickle.UnpicklingError(f"storage {shown(key, 20)} is declared twice with different types/sizes")
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return _Storage(self, key, 0, numel, dt)
    if not (type(view) is tuple and len(view) == 3 and type(view[1]) is int and type(view[2]) is int
            and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
      raise UnsafePickleError(f"invalid storage view {shown(view)}")
    return _Storage(self, key, view[1], view[2], dt)

  def add(self, key: str, raw: bytes, order: str) -> None:
    """Stores the bytes of storage ``key`` (``order``: ``<`` or ``>``)."""
    dt, numel = self.declared[key]
    if len(raw) != numel * dt.itemsize:
      raise ConversionError(f"the file is truncated (storage {shown(key, 20)} has {len(raw)} of its "
                            f"{numel * dt.itemsize} bytes)")
    self.arrays[key] = np.frombuffer(raw, dt.newbyteorder(order))
    self.budget += _EXPANSION * len(raw)

  def spend(self, nbytes: int) -> None:
    self.budget -= nbytes
    if self.budget < 0:
      raise pickle.UnpicklingError(f"its tensors view their storages more than {_EXPANSION} times over; "
                                   "not a weights file")


class _LazyTensor(Placeholder):
  """A tensor whose bytes are read after the pickle; :meth:`resolve` copies them out."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def resolve(self) -> np.ndarray:
    st = self.storage
    if st.key not in st.data.arrays:
      raise pickle.UnpicklingError(f"no bytes were found for storage {shown(st.key, 20)}")
    data = st.data.arrays[st.key][st.start:st.start + st.numel]
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    if self.offset + sum((s - 1) * t for s, t in zip(self.size, self.stride)) + 1 > data.size:
      raise pickle.UnpicklingError(f"a tensor of size {self.size} runs past its storage ({data.size} "
                                   "elements)")
    st.data.spend(math.prod(self.size) * data.itemsize)
    # A copy: the result must not alias the file's buffer.
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=tuple(t * data.itemsize for t in self.stride)).copy()


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _LazyTensor:
  if not isinstance(storage, _Storage):
    raise UnsafePickleError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
  size, stride = safe_pickle.dims(size, "a tensor size"), safe_pickle.dims(stride, "a tensor stride")
  if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride) or len(size) > 64:
    raise UnsafePickleError(f"invalid tensor offset/size/stride {shown(storage_offset)}, {size}, {stride}")
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _LazyTensor:
  _check_tensor_extras(requires_grad, backward_hooks)
  if not (metadata is None or isinstance(metadata, dict)):
    raise UnsafePickleError(f"tensor metadata is a {type(metadata).__name__}")
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _LazyTensor:
  _check_tensor_extras(requires_grad, backward_hooks)
  if not isinstance(data, _LazyTensor):
    raise UnsafePickleError(f"a parameter rebuilt from a {type(data).__name__}, not a tensor")
  return data


def _check_tensor_extras(requires_grad: Any, backward_hooks: Any) -> None:
  # Values that do not change the tensor, but must be what torch writes.
  if type(requires_grad) is not bool or not (backward_hooks is None or isinstance(backward_hooks, dict)):
    raise UnsafePickleError("invalid requires_grad/backward_hooks in a tensor")


def _size(dims: Any = ()) -> tuple[int, ...]:
  return safe_pickle.dims(dims, "a torch.Size")


TENSOR_GLOBALS: safe_pickle.Allowed = {
    **safe_pickle.PLAIN_DATA,
    **safe_pickle.allow({
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch", "Size"): _size,
        **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    }),
}
"""The globals a torch file of tensors in dicts/lists needs (with numpy scalars, e.g. a stored accuracy)."""


def _unpickler(f: Any, allowed: safe_pickle.Allowed | None = None, data: _Bytes | None = None
               ) -> safe_pickle.Unpickler:
  """The restricted unpickler for one pickle of a torch file (no globals unless ``allowed``)."""
  return safe_pickle.Unpickler(f, allowed or {}, reader="the torch-free reader",
                               persistent_load=None if data is None else data.persistent_load)


def _read_zip(path: Path) -> Any:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ConversionError(f"{path} is a zip without exactly one data.pkl, not a PyTorch weights file")
    root = pkl[0][:-len("data.pkl")]
    order = "<"
    if f"{root}byteorder" in names and z.read(f"{root}byteorder").strip() == b"big":
      order = ">"
    data = _Bytes()
    obj = _unpickler(io.BytesIO(z.read(pkl[0])), TENSOR_GLOBALS, data).load()
    for key, (dt, numel) in data.declared.items():
      with z.open(f"{root}data/{key}") as member:  # reads no more than the storage's size
        data.add(key, member.read(numel * dt.itemsize), order)
  return safe_pickle.resolve(obj)


def _read_legacy(path: Path) -> Any:
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    try:
      magic = _unpickler(f).load()
    except UnsafePickleError:
      raise
    except Exception:  # noqa: BLE001 — any garbage raises something
      magic = None
    if magic != _LEGACY_MAGIC:
      raise ConversionError(f"{path} is not a readable PyTorch weights file (neither torch's zip nor its "
                            "legacy format; truncated?)")
    if _unpickler(f).load() != 1001:
      raise ConversionError(f"{path} has an unknown torch legacy protocol")
    sys_info = safe_pickle.resolve(_unpickler(f).load())
    order = ">" if isinstance(sys_info, dict) and sys_info.get("little_endian") is False else "<"
    data = _Bytes()
    obj = _unpickler(f, TENSOR_GLOBALS, data).load()
    keys = safe_pickle.resolve(_unpickler(f).load())
    if not (isinstance(keys, list) and all(k in data.declared for k in keys)):
      raise ConversionError(f"{path}: the storage keys after the pickle do not match the pickle's")
    for key in keys:
      dt, numel = data.declared[key]
      head = f.read(8)
      stored = int(np.frombuffer(head, order + "i8")[0]) if len(head) == 8 else -1
      # Checked before reading, so that a crafted size cannot make read() allocate it.
      if stored != numel or numel * dt.itemsize > size - f.tell():
        raise ConversionError(f"{path} is truncated (storage {shown(key, 20)} is incomplete)")
      data.add(key, f.read(numel * dt.itemsize), order)
  return safe_pickle.resolve(obj)


def read_torch_file(path: str | os.PathLike) -> Any:
  """Reads a torch ``.pth`` (zip or legacy format) holding tensors in dicts/lists, without torch.

  Every pickle in the file goes through :mod:`jaxft.safe_pickle` with :data:`TENSOR_GLOBALS`, so the
  file cannot run code; tensors come back as numpy arrays (copies, with their dtype, offset and strides).

  Args:
    path: the file; only read.

  Returns:
    The unpickled object with numpy arrays in place of tensors, in plain dicts/lists.

  Raises:
    jaxft.safe_pickle.UnsafePickleError: (a ``pickle.UnpicklingError``) when the file needs a global
      outside :data:`TENSOR_GLOBALS` (e.g. a pickled ``argparse.Namespace``, or ``posix.system``),
      named in the message and in ``global_name``.
    ConversionError: a file that is truncated, malformed or not in a torch format.
  """
  path = Path(path)
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except UnsafePickleError:
    raise
  except (EOFError, zipfile.BadZipFile, KeyError, ValueError, pickle.UnpicklingError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{path} is not a readable PyTorch weights file (truncated?): "
                          f"{type(e).__name__}: {e}") from None


def _torch_version(torch: Any) -> tuple[int, int]:
  m = re.match(r"(\d+)\.(\d+)", str(getattr(torch, "__version__", "")))
  return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def load_torch(path: Path, *, trust_pickle: bool = False) -> Any:
  """Reads a torch pickle: with :func:`read_torch_file` when it holds only tensors, else with torch —
  ``weights_only=True`` (torch >= 2.6), or ``weights_only=False`` only when ``trust_pickle``.

  Args:
    path: the file; only read.
    trust_pickle: allow running code from the file (``torch.load(weights_only=False)``) when the
      restricted reader refuses it. Only for files you made yourself.

  Raises:
    ConversionError: the file needs a global that is not loaded without ``trust_pickle`` (named in the
      message, which says how to proceed), torch is needed but not installed, or the file is not a
      readable torch file.
  """
  # The restricted reader first: it needs no torch (which is big and slow to import) and runs no code.
  try:
    return read_torch_file(path)
  except UnsafePickleError as e:
    refused = e
  try:
    import torch  # lazily: safetensors and plain tensor files need no torch
  except ImportError:
    torch = None
  if trust_pickle:
    if torch is None:
      raise ConversionError(f"reading {path.name} needs PyTorch (pip install torch): {refused}") from None
    log.warning("%s: %s; loading it with torch.load(weights_only=False) as trust_pickle=True asks: this "
                "runs code from the file", path.name, refused)
    return _torch_load(torch, path, weights_only=False)
  if torch is None:
    note = "PyTorch, not installed here, reads a few more tensor types safely (pip install torch)"
  elif _torch_version(torch) < _SAFE_TORCH:
    note = (f"the installed PyTorch {torch.__version__} is older than 2.6, whose weights_only=True loader "
            "is not safe, so it was not asked")
  else:
    try:
      return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises many types for a refused or bad file
      note = f"torch.load(weights_only=True) refuses it too ({type(e).__name__})"
  raise ConversionError(f"{path.name}: {refused}; {note}. {_TRUST_HINT}.") from None


def _torch_load(torch: Any, path: Path, *, weights_only: bool) -> Any:
  try:
    return torch.load(path, map_location="cpu", weights_only=weights_only)
  except Exception as e:  # noqa: BLE001
    raise ConversionError(
        f"{path} is not a readable PyTorch weights file (truncated or not a checkpoint?): "
        f"{type(e).__name__}: {e}") from None
