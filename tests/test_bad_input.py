"""Crafted input: no file jaxft reads runs code (torch checkpoints in both formats, the converter CLI,
CIFAR batches), and crafted arguments to the allowed globals are refused."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxft import convert, data, safe_pickle
from jaxft.convert import read_torch_file
from jaxft.data import DataError
from jaxft.safe_pickle import UnsafePickleError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Payloads: objects whose unpickling creates a marker file.


class _System:
  """Unpickles as ``os.system("touch MARKER")`` (the global is ``posix.system`` on Linux)."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


class _Exec:
  """Unpickles as ``builtins.exec("open(MARKER, 'w').close()")``."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {"os.system": (_System, f"{os.system.__module__}.system"),
            "builtins.exec": (_Exec, "builtins.exec")}


@pytest.fixture(params=sorted(PAYLOADS))
def payload(request, tmp_path):
  """``(payload object, the global it names, the marker path it would create)``."""
  cls, name = PAYLOADS[request.param]
  marker = tmp_path / f"MARKER-{request.param}"
  return cls(marker), name, marker


def test_the_payloads_are_real(payload):
  # Proof that the tests below can fail: plain pickle runs the payload.
  obj, _, marker = payload
  pickle.loads(pickle.dumps(obj))
  assert marker.exists()


def test_payload_is_refused_by_the_restricted_unpickler(payload):
  obj, name, marker = payload
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    with pytest.raises(UnsafePickleError, match=f"needs {name}, which jaxft does not load") as e:
      safe_pickle.loads(pickle.dumps({"x": [obj]}, protocol=protocol), safe_pickle.PLAIN_DATA)
    assert e.value.global_name == name
  assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Torch files.


def _state_dict_with(entry):
  """A real cifar_resnet20 state dict (torch tensors) with one more entry, ``crafted``."""
  torch = pytest.importorskip("torch")
  from jaxft.convert import tables
  from jaxft.models import get_spec
  spec = get_spec("cifar_resnet20")
  shapes = tables.target_shapes(spec)
  sd = collections.OrderedDict((e.torch, torch.randn(tables.torch_shape(e.rule, shapes[e.path])))
                               for e in tables.mapping_table(spec))
  sd["crafted"] = entry
  return sd


def _legacy_magic_first(path: Path, obj) -> None:
  # The legacy format starts with a pickled magic number, which the reader used to load with plain pickle.
  torch = pytest.importorskip("torch")
  buf = io.BytesIO()
  torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
  magic_len = len(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
  path.write_bytes(pickle.dumps(obj, protocol=2) + buf.getvalue()[magic_len:])


def _write(kind: str, path: Path, obj) -> None:
  torch = pytest.importorskip("torch")
  if kind == "zip":
    torch.save({"w": torch.ones(2), "bad": obj}, path)
  elif kind == "legacy":
    torch.save({"w": torch.ones(2), "bad": obj}, path, _use_new_zipfile_serialization=False)
  elif kind == "legacy-magic":
    _legacy_magic_first(path, obj)
  elif kind == "state-dict-zip":
    torch.save(_state_dict_with(obj), path)
  else:
    torch.save(_state_dict_with(obj), path, _use_new_zipfile_serialization=False)


TORCH_KINDS = ["zip", "legacy", "legacy-magic", "state-dict-zip", "state-dict-legacy"]


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_read_torch_file_refuses(kind, payload, tmp_path):
  obj, name, marker = payload
  p = tmp_path / "w.pth"
  _write(kind, p, obj)
  with pytest.raises(UnsafePickleError, match=f"needs {name}") as e:
    read_torch_file(p)
  assert e.value.global_name == name
  assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy-magic", "state-dict-zip", "state-dict-legacy"])
def test_convert_file_refuses_and_says_how_to_proceed(kind, payload, tmp_path):
  obj, name, marker = payload
  p = tmp_path / "w.pth"
  _write(kind, p, obj)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_file(p, "cifar_resnet20")
  msg = str(e.value)
  assert f"needs {name}" in msg and "trust_pickle=True" in msg and "--trust-pickle" in msg
  assert "\n" not in msg
  # convert_source is what training's model.pretrained / distill.teacher files go through.
  with pytest.raises(convert.ConversionError, match=f"needs {name}"):
    convert.convert_source(str(p), "cifar_resnet20")
  assert not marker.exists()


def test_trust_pickle_runs_the_file_as_documented(tmp_path):
  # The opt-in does what its documentation warns about: a state dict with one crafted entry converts,
  # and the entry's code ran.
  pytest.importorskip("torch")
  marker = tmp_path / "MARKER"
  p = tmp_path / "w.pth"
  _write("state-dict-zip", p, _System(marker))
  model = convert.convert_file(p, "cifar_resnet20", trust_pickle=True)
  assert marker.exists() and model.meta["arch"] == "cifar_resnet20"


def test_training_pretrained_and_teacher_files_are_refused_unless_trusted(payload, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from jaxft import train  # pylint: disable=g-import-not-at-top
  obj, name, marker = payload
  p = tmp_path / "w.pth"
  _write("state-dict-zip", p, obj)
  config = tiny.get_config()
  config.model.arch, config.model.pretrained = "cifar_resnet20", str(p)
  with pytest.raises(convert.ConversionError, match=f"needs {name}"):
    train.load_base_model(config, jax.random.key(0))
  config.model.pretrained, config.distill.teacher = "", str(p)
  with pytest.raises(convert.ConversionError, match=f"needs {name}"):
    train.load_teacher(config, None)
  assert not marker.exists()
  if name == "builtins.exec" or not _has_torch():
    return
  config.model.trust_pickle = True  # the documented opt-in runs the file's code
  train.load_teacher(config, None)
  assert marker.exists()


def _has_torch() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


@pytest.mark.parametrize("kind", ["state-dict-zip", "state-dict-legacy"])
def test_cli_refuses_with_one_line(kind, payload, tmp_path):
  obj, name, marker = payload
  p = tmp_path / "w.pth"
  _write(kind, p, obj)
  cmd = [sys.executable, str(ROOT / "tools" / "convert_torch_weights.py"), str(p), str(tmp_path / "out"),
         "--arch", "cifar_resnet20"]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's jaxft, also where another is installed
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1]
  assert f"needs {name}" in errors[0] and "--trust-pickle" in errors[0]
  assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# CIFAR batches.


def _cifar_folder(root: Path, meta, batch) -> Path:
  d = root / "cifar-10-batches-py"
  d.mkdir()
  (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
  (d / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
  return d


@pytest.mark.parametrize("where", ["batches.meta", "data_batch_1"])
def test_cifar_source_refuses(where, payload, tmp_path):
  obj, name, marker = payload
  meta = {b"label_names": [b"a", b"b"]}
  batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
  (meta if where == "batches.meta" else batch)[b"extra"] = obj
  d = _cifar_folder(tmp_path, meta, batch)
  with pytest.raises(DataError, match=f"refusing {where} in .*needs {name}, which jaxft does not load"):
    data.load_source(f"cifar:{d}", cache_dir=False)
  assert not marker.exists()


def test_cifar_refuses_object_arrays(tmp_path):
  batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([0, 1], dtype=object)}
  d = _cifar_folder(tmp_path, {b"label_names": [b"a", b"b"]}, batch)
  with pytest.raises(DataError, match="refusing data_batch_1 .*numpy dtype 'O8'"):
    data.load_source(f"cifar:{d}", cache_dir=False)


# ---------------------------------------------------------------------------------------------------------
# Crafted arguments to allowed globals: hand-written opcodes.

PROTO = b"\x80\x02"
MARK, TUPLE, EMPTY_TUPLE, REDUCE, BUILD, STOP = b"(", b"t", b")", b"R", b"b", b"."
EMPTY_DICT, EMPTY_LIST, SETITEM, APPEND, NONE, FALSE = b"}", b"]", b"s", b"a", b"N", b"\x89"
NEWOBJ, BINPERSID, BINPUT, BINGET = b"\x81", b"Q", b"q", b"h"


def g(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def s(text: str) -> bytes:
  b = text.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def i(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def t(*items: bytes) -> bytes:
  return MARK + b"".join(items) + TUPLE


def storage(key: str = "0", numel: int = 4, stype: str = "FloatStorage") -> bytes:
  return t(s("storage"), g("torch", stype), s(key), s("cpu"), i(numel)) + BINPERSID


def tensor(st: bytes, offset: int = 0, size=(2,), stride=(1,)) -> bytes:
  args = t(st, i(offset), t(*map(i, size)), t(*map(i, stride)), FALSE, g("collections", "OrderedDict")
           + EMPTY_TUPLE + REDUCE)
  return g("torch._utils", "_rebuild_tensor_v2") + args + REDUCE


def torch_zip(path: Path, body: bytes, storages: dict[str, bytes] | None = None) -> Path:
  """A torch zip file whose data.pkl is ``{'w': body}``."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", PROTO + EMPTY_DICT + s("w") + body + SETITEM + STOP)
    if storages is None:
      storages = {"0": np.arange(4, dtype="<f4").tobytes()}
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return path


def test_hand_written_tensor_reads(tmp_path):
  # The baseline the crafted variants below differ from.
  got = read_torch_file(torch_zip(tmp_path / "w.pth", tensor(storage(), offset=1, size=(2,), stride=(2,))))
  np.testing.assert_array_equal(got["w"], [1.0, 3.0])


CRAFTED_TENSORS = {
    "a string as the storage": (tensor(s("not a storage")), UnsafePickleError, "not a storage"),
    "a negative stride": (tensor(storage(), offset=3, stride=(-1,)), UnsafePickleError, "non-negative ints"),
    "a negative offset": (tensor(storage(), offset=-1), UnsafePickleError, "invalid tensor offset"),
    "past the storage": (tensor(storage(), size=(5,)), convert.ConversionError, "runs past its storage"),
    "a huge numel": (tensor(storage(numel=1 << 30)), convert.ConversionError, "truncated"),
    "an unknown storage type": (tensor(storage(stype="PythonStorage")), UnsafePickleError,
                                "needs torch.PythonStorage"),
    "a bad persistent id": (t(s("storage"), s("FloatStorage")) + BINPERSID, UnsafePickleError,
                            "unknown persistent id"),
    "a parameter of a string": (g("torch._utils", "_rebuild_parameter") + t(s("x"), FALSE, NONE) + REDUCE,
                                UnsafePickleError, "not a tensor"),
    "BUILD on a tensor": (tensor(storage()) + t(NONE, EMPTY_DICT) + BUILD, UnsafePickleError,
                          "sets the state of a _LazyTensor"),
    "BUILD on a storage type": (g("torch", "FloatStorage") + EMPTY_DICT + BUILD, UnsafePickleError,
                                "sets the state of a _StorageType"),
    "NEWOBJ of OrderedDict": (g("collections", "OrderedDict") + EMPTY_TUPLE + NEWOBJ, convert.ConversionError,
                              "NEWOBJ class argument"),
    # An OrderedDict whose BUILD installs an allowed callable as its __setstate__, then BUILDs again:
    # the second BUILD may only call that stand-in, which checks its argument.
    "a crafted __setstate__": (g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
                               + t(NONE, EMPTY_DICT + s("__setstate__")
                                   + g("torch._utils", "_rebuild_parameter") + SETITEM)
                               + BUILD + s("payload") + BUILD,
                               UnsafePickleError, "not a tensor"),
    "a cycle": (EMPTY_LIST + BINPUT + b"\x07" + BINGET + b"\x07" + APPEND, UnsafePickleError, "cycle"),
    # A BUILD on an allowed global would otherwise set attributes (e.g. __defaults__) of the shared stand-in
    # function, poisoning every later load in the process.
    "BUILD on an allowed global": (g("collections", "OrderedDict") + t(NONE, EMPTY_DICT + s("__defaults__")
                                   + t(t(t(s("injected"), i(1)))) + SETITEM) + BUILD, UnsafePickleError,
                                   "sets the state of a StandIn"),
    "an allowed global as a value": (g("collections", "OrderedDict"), UnsafePickleError, "bare StandIn"),
    "BUILD on a numpy scalar": (g("numpy.core.multiarray", "scalar") + t(
        g("numpy", "dtype") + t(s("u1"), FALSE, FALSE) + REDUCE
        + t(i(3), s("|"), NONE, NONE, NONE, i(-1), i(-1), i(0)) + BUILD, s("a")) + REDUCE + t(NONE) + BUILD,
                                UnsafePickleError, "sets the state of a _Value"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_TENSORS))
def test_crafted_torch_arguments_are_refused(case, tmp_path):
  body, error, message = CRAFTED_TENSORS[case]
  p = torch_zip(tmp_path / "w.pth", body)
  with pytest.raises(error, match=message):
    read_torch_file(p)
  with pytest.raises(convert.ConversionError):
    convert.load_state_dict(p)


def test_build_on_ordered_dict_sets_nothing_that_survives(tmp_path):
  # Instance attributes (e.g. an 'items' shadowing the method) are dropped: the result is rebuilt.
  body = (g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + s("k") + i(1) + SETITEM
          + t(NONE, EMPTY_DICT + s("items") + g("collections", "OrderedDict") + SETITEM) + BUILD)
  got = read_torch_file(torch_zip(tmp_path / "w.pth", body))
  assert got["w"] == {"k": 1} and type(got["w"]) is collections.OrderedDict and "items" not in vars(got["w"])


def test_shared_references_do_not_expand(tmp_path):
  # 40 levels of [x, x]: 2**40 leaves if copied, one object per level when shared.
  POP, APPENDS = b"0", b"e"
  body = tensor(storage()) + BINPUT + b"\x00" + POP
  for _ in range(40):
    body += EMPTY_LIST + MARK + BINGET + b"\x00" + BINGET + b"\x00" + APPENDS + BINPUT + b"\x00" + POP
  node = read_torch_file(torch_zip(tmp_path / "w.pth", body + BINGET + b"\x00"))["w"]
  for _ in range(40):
    assert node[0] is node[1]
    node = node[0]
  np.testing.assert_array_equal(node, [0.0, 1.0])


def test_many_views_of_one_storage_are_bounded(tmp_path, monkeypatch):
  from jaxft.convert import torch_pickle
  monkeypatch.setattr(torch_pickle, "_SLACK", 0)
  views = EMPTY_LIST + MARK + b"".join(tensor(storage(), size=(4,)) for _ in range(9)) + b"e"
  with pytest.raises(convert.ConversionError, match="more than 8 times over"):
    read_torch_file(torch_zip(tmp_path / "w.pth", views))


@pytest.mark.parametrize("case,body,message", [
    ("object dtype", g("numpy", "dtype") + t(s("O8"), FALSE, FALSE) + REDUCE, "numpy dtype 'O8'"),
    ("structured dtype state", g("numpy", "dtype") + t(s("f4"), FALSE, FALSE) + REDUCE
     + t(i(3), s("<"), NONE, t(s("a")), NONE, i(-1), i(-1), i(0)) + BUILD, "structured or subarray"),
    ("_reconstruct of another class", g("numpy.core.multiarray", "_reconstruct")
     + t(g("collections", "OrderedDict"), t(i(0)), s("b")) + REDUCE, "only rebuild a numpy.ndarray"),
    ("array bytes of the wrong length", g("numpy.core.multiarray", "_reconstruct")
     + t(g("numpy", "ndarray"), t(i(0)), s("b")) + REDUCE
     + t(i(1), t(i(4)), g("numpy", "dtype") + t(s("u1"), FALSE, FALSE) + REDUCE
         + t(i(3), s("|"), NONE, NONE, NONE, i(-1), i(-1), i(0)) + BUILD, FALSE, s("ab")) + BUILD,
     "array data is 2 bytes"),
    ("ndarray called", g("numpy", "ndarray") + t(i(3)) + REDUCE, "first argument of _reconstruct"),
    ("getattr", g("builtins", "getattr") + t(NONE, s("x")) + REDUCE, "needs builtins.getattr"),
    ("python 2 eval", g("__builtin__", "eval") + t(s("1")) + REDUCE, "needs builtins.eval"),
    ("subprocess", g("subprocess", "check_call") + t(s("true")) + REDUCE, "needs subprocess.check_call"),
    # EXT1 looks a global up in copyreg's registry, which is empty unless the host process fills it.
    ("extension code", b"\x82\x01", "unregistered extension code 1"),
    # STACK_GLOBAL takes any strings: control characters are escaped in the message.
    ("escape sequences", s("os\x1b[2J") + s("system\nok") + b"\x93",
     r"needs os\\x1b\[2J\.system\\nok, which"),
])
def test_crafted_plain_data_is_refused(case, body, message):
  with pytest.raises(pickle.UnpicklingError, match=message):
    safe_pickle.loads(PROTO + body + STOP, safe_pickle.PLAIN_DATA)


def test_plain_data_round_trips_like_pickle():
  # Everything a CIFAR batch or a saved array holds, in every protocol, reads as plain pickle reads it.
  rng = np.random.default_rng(0)
  obj = {b"data": rng.integers(0, 256, (3, 8), dtype=np.uint8), "f": np.asfortranarray(rng.random((2, 3))),
         "be": np.arange(3, dtype=">i4"), "empty": np.zeros((0, 2), np.float16), "0d": np.array(2.5),
         "b": np.array([True, False]), "c": np.arange(2, dtype=np.complex64), "scalar": np.float32(1.5),
         "od": collections.OrderedDict(a=1), "set": {1, 2}, "fs": frozenset({3}), "bytes": b"\x00\xff",
         "nested": [(1, 2.0, None, True, "s")]}
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    blob = pickle.dumps(obj, protocol=protocol)
    got, want = safe_pickle.loads(blob, safe_pickle.PLAIN_DATA), pickle.loads(blob)
    assert got.keys() == want.keys()
    for k in want:
      if isinstance(want[k], np.ndarray):
        assert got[k].dtype == want[k].dtype and got[k].flags.writeable
        np.testing.assert_array_equal(got[k], want[k])
      else:
        assert got[k] == want[k] and type(got[k]) is type(want[k]), k


@pytest.mark.parametrize("damage", ["huge size", "cut short", "size differs from the pickle's"])
def test_legacy_storage_sizes_are_checked_before_reading(damage, tmp_path):
  torch = pytest.importorskip("torch")
  p = tmp_path / "w.pth"
  torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
  raw = p.read_bytes()  # ends with the one storage: int64 numel (2), then 2 float32s
  assert raw[-16:-8] == struct.pack("<q", 2)
  raw = {"huge size": raw[:-16] + struct.pack("<q", 1 << 60) + raw[-8:], "cut short": raw[:-4],
         "size differs from the pickle's": raw[:-16] + struct.pack("<q", 1) + raw[-8:-4]}[damage]
  p.write_bytes(raw)
  with pytest.raises(convert.ConversionError, match="is truncated"):
    read_torch_file(p)
