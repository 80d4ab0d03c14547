"""The one restricted unpickler: every pickle jaxft reads goes through it, so no file can run code.

Unpickling calls whatever callables the pickle names: ``pickle.load`` of a file whose pickle says
``posix.system("…")`` or ``builtins.exec("…")`` runs that, before any check of the result. Here every
global a pickle names is looked up in an explicit allow-list (``{(module, name): stand-in}``) and
anything else raises :class:`UnsafePickleError` naming ``module.name``. The stand-ins are never the real
objects behind the names but functions written for the purpose that check their arguments and build
plain values (numpy arrays are built with ``np.frombuffer``; no numpy ``__setstate__`` runs).

An allow-list alone is not enough, because a pickle can still

* call an allowed callable with arguments of its choosing (REDUCE) — so each stand-in validates them;
* call ``__setstate__`` of whatever object is on its stack (BUILD) — so the stand-ins themselves
  (:class:`StandIn`) and their results derive from :class:`Placeholder` (``__slots__``, a
  ``__setstate__`` that refuses, or checks a state once); no real numpy object is on the stack; a BUILD
  on a plain ``OrderedDict`` only sets instance attributes, which :func:`resolve` drops;
* ask for ``cls.__new__(cls, …)`` (NEWOBJ) — refused by pickle itself, the stand-ins are not classes;
* build cycles and shared objects — :func:`resolve` refuses cycles and shares repeated objects, so a
  small pickle cannot expand exponentially.

:func:`resolve` finally rebuilds the result from scratch out of plain ``dict``/``OrderedDict``/``list``/
``tuple``/``set`` containers, scalars and the placeholders' values, refusing anything else.

Users: :mod:`jaxft.convert.torch_pickle` (torch checkpoints), :mod:`jaxft.data.sources` (CIFAR batches),
:mod:`jaxft.data.decode` (its workers' replies).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
from typing import Any, Callable, Mapping

import numpy as np

# (module, name) → the stand-in returned for it (a function, or a Placeholder instance).
Allowed = Mapping[tuple[str, str], Any]

# How deep containers may nest; a state dict nests 3 or 4 deep.
MAX_DEPTH = 200


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle that names a global outside the allow-list, or misuses an allowed one.

  Attributes:
    global_name: the offending ``module.name`` (Python 3 spelling), when a global was refused.
  """

  def __init__(self, message: str, global_name: str | None = None):
    super().__init__(message)
    self.global_name = global_name


class Placeholder:
  """Base of the objects stand-ins return: no ``__dict__``; BUILD on one is refused.

  :func:`resolve` replaces each placeholder by :meth:`resolve`'s value.
  """

  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise UnsafePickleError(f"the pickle sets the state of a {type(self).__name__}, which never has one")

  def resolve(self) -> Any:
    """Returns the plain value this placeholder stands for."""
    raise UnsafePickleError(f"the pickle holds a bare {type(self).__name__} outside the value it belongs to")


class StandIn(Placeholder):
  """An allowed global: calls ``fn``. A pickle can neither instantiate it as a class (NEWOBJ) nor change
  it (BUILD), so one file cannot tamper with the stand-ins (e.g. their defaults) of the next."""

  __slots__ = ("fn",)

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)


def allow(table: Mapping[tuple[str, str], Any]) -> Allowed:
  """An allow-list from ``{(module, name): function or Placeholder}``: functions wrapped in StandIn."""
  return {k: v if isinstance(v, Placeholder) else StandIn(v) for k, v in table.items()}


class _Value(Placeholder):
  """A value built during unpickling, handed out only by :func:`resolve` (a real numpy object on the
  pickle's stack would let a BUILD call its ``__setstate__``)."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def resolve(self) -> Any:
    return self.value


def shown(x: Any, limit: int = 80) -> str:
  """``str(x)`` cut to ``limit`` characters, control characters escaped: for messages quoting a file's
  content (which must not be able to drive the terminal)."""
  text = str(x)[:limit]
  return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _text(x: Any, what: str) -> str:
  # Python 2 pickles read with encoding="bytes" give bytes where Python 3 gives str.
  if isinstance(x, bytes):
    try:
      return x.decode("ascii")
    except UnicodeDecodeError:
      pass
  if not isinstance(x, str):
    raise UnsafePickleError(f"{what} must be a string, got {type(x).__name__}")
  return x


def _raw(x: Any, what: str) -> bytes | bytearray:
  if isinstance(x, str):  # Python 2 byte strings read with encoding="latin1"
    return x.encode("latin1")
  if not isinstance(x, (bytes, bytearray)):
    raise UnsafePickleError(f"{what} must be bytes, got {type(x).__name__}")
  return x


def dims(x: Any, what: str) -> tuple[int, ...]:
  """``x`` as a tuple of non-negative ints (bools refused), or UnsafePickleError."""
  if not isinstance(x, (tuple, list)) or not all(type(d) is int and d >= 0 for d in x):
    raise UnsafePickleError(f"{what} must be a tuple of non-negative ints, got {shown(x)}")
  return tuple(x)


# ---------------------------------------------------------------------------------------------------------
# numpy arrays, dtypes and scalars.

# Plain numeric dtypes only: an object dtype would unpickle arbitrary objects into the array.
_NUMERIC_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8",
                             "c16"})


class _Dtype(Placeholder):
  """``numpy.dtype(name, align, copy)``; its BUILD sets the byte order."""

  __slots__ = ("name", "order")

  def __init__(self, name: str, order: str | None = None):
    self.name, self.order = name, order

  def __setstate__(self, state: Any) -> None:
    if self.order is not None:
      raise UnsafePickleError("the pickle sets the state of a numpy dtype twice")
    if not (isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None, None, None)):
      raise UnsafePickleError(f"unsupported numpy dtype state {shown(state)} (structured or subarray?)")
    order = _text(state[1], "a dtype's byte order")
    if order not in ("<", ">", "|", "="):
      raise UnsafePickleError(f"unknown numpy byte order {order!r}")
    self.order = order

  def dtype(self) -> np.dtype:
    """The numpy dtype, with its byte order."""
    dt = np.dtype(self.name)
    return dt.newbyteorder(self.order) if self.order in ("<", ">") else dt

  def resolve(self) -> np.dtype:
    return self.dtype()


def _dtype(name: Any, align: Any = False, copy: Any = True) -> _Dtype:
  del align, copy  # irrelevant for the plain dtypes allowed
  name = _text(name, "a numpy dtype name")
  if name not in _NUMERIC_DTYPES:
    raise UnsafePickleError(f"the pickle needs numpy dtype {name[:20]!r}; only plain numeric dtypes "
                            f"({', '.join(sorted(_NUMERIC_DTYPES))}) are loaded")
  return _Dtype(name)


def _as_dtype(x: Any) -> np.dtype:
  if not isinstance(x, _Dtype):
    raise UnsafePickleError(f"expected a numpy dtype, got {type(x).__name__}")
  return x.dtype()


def _from_bytes(raw: bytes | bytearray, dt: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
  """A writable array of ``shape`` over exactly ``raw`` (copied unless it is already a private buffer)."""
  n = math.prod(shape)
  if len(raw) != n * dt.itemsize:
    raise UnsafePickleError(f"array data is {len(raw)} bytes, its shape {shape} and dtype {dt} need "
                            f"{n * dt.itemsize}")
  a = np.frombuffer(raw, dt).reshape(shape, order=order)
  return a if a.flags.writeable else a.copy()


def _ndarray(*args: Any) -> None:
  raise UnsafePickleError("numpy.ndarray may only appear as the first argument of _reconstruct")


class _Array(Placeholder):
  """``numpy.core.multiarray._reconstruct(ndarray, …)``; its BUILD brings shape, dtype and bytes."""

  __slots__ = ("array",)

  def __init__(self):
    self.array: np.ndarray | None = None

  def __setstate__(self, state: Any) -> None:
    if self.array is not None:
      raise UnsafePickleError("the pickle sets the state of a numpy array twice")
    if isinstance(state, tuple) and len(state) == 5:
      state = state[1:]  # (version, shape, dtype, is_fortran, data)
    if not (isinstance(state, tuple) and len(state) == 4 and type(state[2]) in (bool, int)):
      raise UnsafePickleError(f"unsupported numpy array state {shown(state)}")
    shape, dt, fortran, raw = state
    a = _from_bytes(_raw(raw, "array data"), _as_dtype(dt), dims(shape, "an array shape"),
                    "F" if fortran else "C")
    # As numpy's own __setstate__ does: arrays come back in native byte order.
    self.array = a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

  def resolve(self) -> np.ndarray:
    if self.array is None:
      raise UnsafePickleError("a numpy array without its data")
    return self.array


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
  if cls is not NUMPY[("numpy", "ndarray")]:
    raise UnsafePickleError("numpy _reconstruct may only rebuild a numpy.ndarray")
  del shape, typecode  # the placeholder shape; the real one comes with the state
  return _Array()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _Value:
  order = _text(order, "an array order")
  if order not in ("C", "F"):
    raise UnsafePickleError(f"unknown array order {order!r}")
  return _Value(_from_bytes(_raw(buf, "array data"), _as_dtype(dtype), dims(shape, "an array shape"), order))


def _scalar(dtype: Any, data: Any) -> _Value:
  return _Value(_from_bytes(_raw(data, "scalar data"), _as_dtype(dtype), (), "C")[()])


NUMPY: Allowed = allow({
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _dtype,
})
"""numpy arrays, scalars and dtypes of plain numeric types (what a CIFAR batch or a saved array holds)."""

# ---------------------------------------------------------------------------------------------------------
# Builtins that protocols 0–2 name as globals.


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
  # Protocols < 3 write a bytes object as _codecs.encode(its latin-1 text, "latin1").
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError("_codecs.encode is only loaded for bytes (a str and 'latin1')")
  return text.encode("latin1")


def _bytes(x: Any = b"") -> bytes:
  # Protocols < 3 write b"" as bytes().
  if type(x) is not bytes:
    raise UnsafePickleError("builtins.bytes is only loaded for b''")
  return x


def _items(x: Any = ()) -> list[Any]:
  if not isinstance(x, (list, tuple)):
    raise UnsafePickleError(f"expected a list of items, got {type(x).__name__}")
  return list(x)


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
  if not isinstance(items, (list, tuple, dict)):
    raise UnsafePickleError(f"OrderedDict from a {type(items).__name__}")
  return collections.OrderedDict(items)


def _set(items: Any = ()) -> set:
  return set(_items(items))


def _frozenset(items: Any = ()) -> frozenset:
  return frozenset(_items(items))


BUILTINS: Allowed = allow({
    ("_codecs", "encode"): _encode,
    ("builtins", "bytes"): _bytes,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("collections", "OrderedDict"): _ordered_dict,
})
"""Plain values that protocols 0–2 build by calling a global (bytes, set, frozenset, OrderedDict)."""

PLAIN_DATA: Allowed = {**BUILTINS, **NUMPY}
"""Plain values and numeric numpy arrays/scalars: what a CIFAR batch or a pickled array needs."""

# ---------------------------------------------------------------------------------------------------------
# The unpickler and the final walk.


class Unpickler(pickle.Unpickler):
  """A :class:`pickle.Unpickler` resolving only the globals in ``allowed``.

  Its :meth:`load` returns the raw object, placeholders included (call :func:`resolve` on it, after
  filling whatever the placeholders need); every error is a :class:`pickle.UnpicklingError`.

  Args:
    file: a binary file positioned at the pickle; only read.
    allowed: ``{(module, name): stand-in}`` made by :func:`allow`, e.g. :data:`PLAIN_DATA`.
    persistent_load: called with each persistent id (torch's storages); without it they are an error.
    encoding: how Python 2 byte strings decode (``"bytes"`` keeps them bytes), as for :func:`pickle.load`.
    reader: who refuses, in the error message.
  """

  def __init__(self, file: Any, allowed: Allowed, *, persistent_load: Callable[[Any], Any] | None = None,
               encoding: str = "ASCII", reader: str = "jaxft"):
    super().__init__(file, encoding=encoding)
    if not all(isinstance(v, Placeholder) for v in allowed.values()):
      raise TypeError("allow-list values must be Placeholders (functions wrapped by allow())")
    self._allowed = allowed
    self._persistent = persistent_load
    self._reader = reader

  def find_class(self, module: str, name: str) -> Any:
    """Returns the stand-in for ``module.name``; raises UnsafePickleError for anything not allowed."""
    # Python 2 names, as pickle.Unpickler.find_class maps them (its own lookup is never used).
    key = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    key = (_compat_pickle.IMPORT_MAPPING.get(key[0], key[0]), key[1])
    if key in self._allowed:
      return self._allowed[key]
    # Named as Python 3 names it (a protocol-2 pickle writes builtins.exec as __builtin__.exec).
    full = ".".join(key)
    raise UnsafePickleError(f"the pickle needs {shown(full, 200)}, which {self._reader} does not load: "
                            "unpickling it could run code from the file", global_name=full)

  def persistent_load(self, pid: Any) -> Any:
    """Passes ``pid`` to the ``persistent_load`` given; refuses it when none was."""
    if self._persistent is None:  # malformed for this kind of file rather than unsafe
      raise pickle.UnpicklingError(f"a persistent id ({shown(pid, 40)}) where none is expected")
    return self._persistent(pid)

  def load(self) -> Any:
    """Returns the raw unpickled object (placeholders included)."""
    try:
      return super().load()
    except pickle.UnpicklingError:
      raise
    except EOFError:
      raise
    except Exception as e:  # noqa: BLE001 — crafted input makes stand-ins and opcodes raise many types
      raise pickle.UnpicklingError(f"malformed pickle: {type(e).__name__}: {shown(e, 200)}") from None


_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))
_KEYS = (str, bytes, int, float, bool, type(None))


def resolve(obj: Any) -> Any:
  """Returns a new plain copy of an :meth:`Unpickler.load` result: containers rebuilt from their items
  (instance attributes a pickle set on an ``OrderedDict`` are dropped), placeholders replaced by their
  values. Objects that occur several times are resolved once and shared; ``obj`` is never mutated.

  Raises:
    UnsafePickleError: a cycle, nesting deeper than :data:`MAX_DEPTH`, a dict key that is not a scalar
      (or tuple of scalars), or an object that is not plain data.
  """
  memo: dict[int, Any] = {}
  active: set[int] = set()

  def walk(o: Any, depth: int) -> Any:
    if isinstance(o, _SCALARS):
      return o
    if id(o) in memo:
      return memo[id(o)]
    if id(o) in active or depth > MAX_DEPTH:
      raise UnsafePickleError("the pickle holds a cycle or nests too deeply; not a plain data file")
    active.add(id(o))
    t = type(o)
    if t in (dict, collections.OrderedDict):
      out = t((_key(walk(k, depth + 1)), walk(v, depth + 1)) for k, v in dict.items(o))
    elif t in (list, tuple, set, frozenset):
      out = t(walk(v, depth + 1) for v in o)
    elif isinstance(o, Placeholder):
      out = o.resolve()
    else:
      raise UnsafePickleError(f"the pickle built a {t.__name__}, which is not plain data")
    active.discard(id(o))
    memo[id(o)] = out
    return out

  try:
    return walk(obj, 0)
  except pickle.UnpicklingError:
    raise
  except Exception as e:  # noqa: BLE001 — e.g. an array as a set member (unhashable)
    raise pickle.UnpicklingError(f"malformed pickle: {type(e).__name__}: {shown(e, 200)}") from None


def _key(k: Any) -> Any:
  if isinstance(k, _KEYS) or (type(k) is tuple and all(isinstance(v, _KEYS) for v in k)):
    return k
  raise UnsafePickleError(f"a dict key of type {type(k).__name__}, which is not a plain scalar")


def loads(data: bytes, allowed: Allowed, *, encoding: str = "ASCII") -> Any:
  """Unpickles ``data`` with only ``allowed``'s globals and returns the plain result (:func:`resolve`).

  Raises:
    UnsafePickleError: a global outside ``allowed`` (named in the message and ``global_name``), or an
      allowed one misused.
    pickle.UnpicklingError, EOFError: a malformed or truncated pickle.
  """
  return resolve(Unpickler(io.BytesIO(data), allowed, encoding=encoding).load())
