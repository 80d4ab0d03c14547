"""Tests for jaxft.data: sources, decoding, cache, splits, deterministic batching."""

from __future__ import annotations

import builtins
import importlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft import data
from jaxft.data import DataError, Dataset, decode, pipeline


def _write_folder(root: Path, per_class: int = 3, classes=("cat", "ant", "bee"), size=(8, 6),
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Writes lossless PNGs into ``root/<class>/`` and returns {relative path: pixels}."""
  rng = np.random.default_rng(seed)
  written = {}
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      px = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
      Image.fromarray(px).save(root / c / f"{i:03d}.png")
      written[f"{c}/{i:03d}.png"] = px
  return written


def _ds(n_per_class: int, num_classes: int, hw: int = 4) -> Dataset:
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), n_per_class)
  # Pixel (0, 0) encodes the example's index, so examples can be told apart after subsetting.
  images = np.zeros((len(labels), hw, hw, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256
  images[:, 0, 0, 1] = np.arange(len(labels)) // 256
  return Dataset(images, labels, tuple(f"c{i}" for i in range(num_classes)))


# --- folder source ---------------------------------------------------------------------------------


def test_folder_source_decodes_labels_and_pixels(tmp_path):
  written = _write_folder(tmp_path / "d")
  (tmp_path / "d" / "cat" / "notes.txt").write_text("not an image")
  ds = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)
  assert ds.class_names == ("ant", "bee", "cat")  # sorted folder names = label order
  assert ds.images.dtype == np.uint8 and ds.images.shape == (9, 6, 8, 3)
  assert ds.labels.dtype == np.int32 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  np.testing.assert_array_equal(ds.images[3], written["bee/000.png"])
  assert ds.skipped == 0 and len(ds) == 9
  assert "9 images 6x8x3, 3 classes (ant, bee, cat)" in data.describe(ds)


def test_folder_split_subfolder_layout(tmp_path):
  _write_folder(tmp_path / "d" / "train", per_class=2)
  _write_folder(tmp_path / "d" / "test", per_class=1)
  assert len(data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)) == 6
  assert len(data.load_source(f"folder:{tmp_path / 'd'}", split="test", cache_dir=False)) == 3
  with pytest.raises(DataError, match="holds splits \\['test', 'train'\\] but no 'val'"):
    data.load_source(f"folder:{tmp_path / 'd'}", split="val", cache_dir=False)


def test_folder_differing_sizes_needs_image_size(tmp_path):
  _write_folder(tmp_path / "d", per_class=1, classes=("a",), size=(8, 6))
  _write_folder(tmp_path / "d", per_class=1, classes=("b",), size=(5, 7))
  with pytest.raises(DataError, match=r"differ in size \(8x6 in 000.png, 5x7 in 000.png\); pass "
                     r"image_size=N"):
    data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)
  ds = data.load_source(f"folder:{tmp_path / 'd'}", image_size=4, cache_dir=False)
  assert ds.images.shape == (2, 4, 4, 3)


def test_folder_corrupt_file_raises_or_is_skipped(tmp_path):
  _write_folder(tmp_path / "d", per_class=2)
  bad = tmp_path / "d" / "bee" / "broken.jpg"
  bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
  with pytest.raises(DataError, match=f"cannot decode image '{bad}'.*pass skip_corrupt=True"):
    data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)
  ds = data.load_source(f"folder:{tmp_path / 'd'}", skip_corrupt=True, cache_dir=False)
  assert ds.skipped == 1 and len(ds) == 6
  assert np.bincount(ds.labels).tolist() == [2, 2, 2]


def test_folder_limit_round_robin_over_classes(tmp_path):
  _write_folder(tmp_path / "d", per_class=3)
  ds = data.load_source(f"folder:{tmp_path / 'd'}", limit=4, cache_dir=False)
  assert ds.labels.tolist() == [0, 0, 1, 2]


def test_folder_grayscale_converted_to_rgb(tmp_path):
  (tmp_path / "d" / "a").mkdir(parents=True)
  Image.fromarray(np.full((3, 3), 77, np.uint8), mode="L").save(tmp_path / "d" / "a" / "g.png")
  ds = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)
  assert ds.images.shape == (1, 3, 3, 3) and (ds.images == 77).all()


# --- image modes: every pillow mode decodes to the right uint8 RGB -----------------------------------

_SIXTEEN = np.array([[0, 128, 129, 25700], [40000, 65279, 65534, 65535]], np.uint16)
_SIXTEEN_RGB = np.repeat(np.floor(_SIXTEEN / 257 + 0.5).astype(np.uint8)[..., None], 3, -1)  # 65535 → 255
_GREY = np.array([[0, 1, 77, 128], [200, 254, 255, 9]], np.uint8)
_GREY_RGB = np.repeat(_GREY[..., None], 3, -1)
_PALETTE = [(10, 20, 30), (200, 100, 0), (0, 255, 128), (7, 7, 250)]
_INDEX = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
_COLOURS = np.random.default_rng(3).integers(0, 256, (2, 4, 3), dtype=np.uint8)


def _paletted(mode: str) -> Image.Image:
  im = Image.fromarray(_INDEX, "L").convert("P") if mode == "P" else Image.new("PA", (4, 2))
  im.putpalette([v for c in _PALETTE for v in c])
  if mode == "PA":
    im.putdata([(int(i), 50) for i in _INDEX.ravel()])
  else:
    im.putdata(_INDEX.ravel().tolist())
  return im


def _lab_grey(l_byte: np.ndarray) -> np.ndarray:
  # pillow's L byte is L* × 255/100; a and b are signed bytes, 0 neutral. CIE L* → Y → sRGB.
  lstar = l_byte / 255 * 100
  y = np.where(lstar > 8, ((lstar + 16) / 116) ** 3, lstar / 903.3)
  srgb = np.where(y > 0.0031308, 1.055 * y ** (1 / 2.4) - 0.055, 12.92 * y)
  return np.repeat(np.round(srgb * 255)[..., None], 3, -1)


def _mode_cases() -> dict[str, tuple]:
  """mode → (image, file suffix or None for in memory only, expected RGB, tolerance)."""
  cmyk = np.random.default_rng(4).integers(0, 256, (2, 4, 4), dtype=np.uint8)
  ycc = np.array([[[81, 90, 240], [145, 54, 34], [41, 240, 110], [128, 128, 128]]] * 2, np.uint8)
  ycc_f = ycc.astype(np.float64) - [0, 128, 128]
  ycc_rgb = np.stack([ycc_f[..., 0] + 1.402 * ycc_f[..., 2],
                      ycc_f[..., 0] - 0.344136 * ycc_f[..., 1] - 0.714136 * ycc_f[..., 2],
                      ycc_f[..., 0] + 1.772 * ycc_f[..., 1]], -1).clip(0, 255)
  alpha = np.array([[255, 128, 64, 90], [255, 255, 200, 100]], np.uint8)
  premul = (_COLOURS * (alpha[..., None] / 255)).round().astype(np.uint8)
  bits = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], bool)
  lab = np.stack([np.array([[0, 64, 128, 192], [255, 10, 100, 230]], np.uint8),
                  np.zeros((2, 4), np.uint8), np.zeros((2, 4), np.uint8)], -1)
  return {
      "I;16": (Image.fromarray(_SIXTEEN), ".png", _SIXTEEN_RGB, 0),
      "I;16B": (Image.frombytes("I;16B", (4, 2), _SIXTEEN.astype(">u2").tobytes()), ".tif", _SIXTEEN_RGB, 0),
      "I;16L": (Image.frombytes("I;16L", (4, 2), _SIXTEEN.astype("<u2").tobytes()), None, _SIXTEEN_RGB, 0),
      "I": (Image.fromarray(_SIXTEEN.astype(np.int32)), ".pgm", _SIXTEEN_RGB, 0),  # a 16-bit PGM opens as I
      "L": (Image.fromarray(_GREY), ".png", _GREY_RGB, 0),
      "1": (Image.fromarray(bits), ".png", np.repeat(bits[..., None] * 255, 3, -1), 0),
      "P": (_paletted("P"), ".png", np.array(_PALETTE)[_INDEX], 0),
      "PA": (_paletted("PA"), ".tif", np.array(_PALETTE)[_INDEX], 0),
      "LA": (Image.fromarray(np.stack([_GREY, alpha], -1), "LA"), ".png", _GREY_RGB, 0),
      "RGBA": (Image.fromarray(np.concatenate([_COLOURS, alpha[..., None]], -1)), ".png", _COLOURS, 0),
      "RGBX": (Image.fromarray(_COLOURS).convert("RGBX"), None, _COLOURS, 0),
      "RGBa": (Image.frombytes("RGBa", (4, 2), np.concatenate([premul, alpha[..., None]], -1).tobytes()),
               None, _COLOURS, 3),  # un-premultiplying 8-bit values is exact only up to rounding
      "La": (Image.frombytes("La", (4, 2), np.stack([np.full((2, 4), 100, np.uint8), np.full((2, 4), 255,
             np.uint8)], -1).tobytes()), None, np.full((2, 4, 3), 100), 0),
      "CMYK": (Image.frombytes("CMYK", (4, 2), cmyk.tobytes()), ".tif",
               np.round((255 - cmyk[..., :3].astype(float)) * (255 - cmyk[..., 3:]) / 255), 1),
      "YCbCr": (Image.frombytes("YCbCr", (4, 2), ycc.tobytes()), ".tif", ycc_rgb, 2),
      "LAB": (Image.frombytes("LAB", (4, 2), lab.tobytes()), ".tif", _lab_grey(lab[..., 0]), 2),
      "HSV": (Image.frombytes("HSV", (4, 2), np.array([[[0, 255, 200], [85, 255, 90], [170, 255, 30],
                                                         [0, 0, 123]]] * 2, np.uint8).tobytes()), None,
              np.array([[[200, 0, 0], [0, 90, 0], [0, 0, 30], [123, 123, 123]]] * 2), 1),
  }


@pytest.mark.parametrize("mode", sorted(_mode_cases()))
def test_every_image_mode_decodes_to_rgb(tmp_path, mode):
  im, suffix, want, tol = _mode_cases()[mode]
  assert im.mode == mode
  if suffix is not None:  # through a file, as the folder source reads it
    path = tmp_path / f"x{suffix}"
    im.save(path)
    with Image.open(path) as back:
      assert back.mode == mode, f"{suffix} reopened as {back.mode}"
    got = decode.decode_image(path, None)
  else:  # no file format stores this mode
    got = np.asarray(decode.to_rgb(im))
  assert got.dtype == np.uint8 and got.shape == (2, 4, 3)
  np.testing.assert_allclose(got.astype(int), np.asarray(want, float), atol=tol, rtol=0)


def test_16_bit_png_is_not_white(tmp_path):
  (tmp_path / "d" / "a").mkdir(parents=True)
  Image.fromarray(_SIXTEEN).save(tmp_path / "d" / "a" / "x.png")
  ds = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)
  np.testing.assert_array_equal(ds.images[0], _SIXTEEN_RGB)


def test_float_and_32_bit_images_are_refused(tmp_path):
  Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "f.tif")
  with pytest.raises(ValueError, match="32-bit float image"):
    decode.decode_image(tmp_path / "f.tif", None)
  Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "i.tif")
  with pytest.raises(ValueError, match=r"32-bit integer image \(values 0..70000\)"):
    decode.decode_image(tmp_path / "i.tif", None)


def test_folder_without_class_folders(tmp_path):
  (tmp_path / "flat").mkdir()
  Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
  with pytest.raises(DataError, match="has no class sub-folders; expected PATH/<class>/<image>"):
    data.load_source(f"folder:{tmp_path / 'flat'}", cache_dir=False)


def test_folder_decode_workers_match_in_process(tmp_path, monkeypatch):
  written = _write_folder(tmp_path / "d", per_class=4)
  bad = tmp_path / "d" / "bee" / "zz.png"
  bad.write_bytes(b"garbage")
  monkeypatch.setattr(decode, "POOL_MIN_FILES", 1)
  monkeypatch.setattr(decode, "num_workers", lambda: 2)
  ds = data.load_source(f"folder:{tmp_path / 'd'}", skip_corrupt=True, cache_dir=False)
  assert ds.skipped == 1 and len(ds) == 12
  np.testing.assert_array_equal(ds.images[5], written["bee/001.png"])
  with pytest.raises(DataError, match=f"cannot decode image '{bad}'"):
    data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=False)


def test_decode_workers_return_files_in_order(tmp_path, monkeypatch):
  written = _write_folder(tmp_path / "d", per_class=4, classes=("a", "b", "c"))  # 12 distinct images
  paths = sorted((tmp_path / "d").glob("*/*.png"))
  monkeypatch.setattr(decode, "POOL_MIN_FILES", 1)
  monkeypatch.setattr(decode, "num_workers", lambda: 3)  # shares of 4: a reordered join shows

  def no_fallback(*_args, **_kwargs):
    raise AssertionError("decoded in this process instead of in the workers")

  monkeypatch.setattr(decode, "decode_in_process", no_fallback)
  got = decode.decode_files(paths, None)
  assert len(got) == 12
  for p, im in zip(paths, got):
    np.testing.assert_array_equal(im, written[f"{p.parent.name}/{p.name}"])


def test_decode_worker_loads_no_jax_beyond_jaxft():
  # A worker imports jaxft.data.decode; only what ``import jaxft`` itself costs may come with it.
  code = ("import sys, jaxft; before = set(sys.modules); import jaxft.data.decode; "
          "new = set(sys.modules) - before; "
          "print(sorted(m for m in new if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == "[]"


def test_package_reexports_the_public_names():
  for module, names in data._NAMES.items():  # jaxft.data.NAME is the submodule's own object
    for name in names:
      assert getattr(data, name) is getattr(importlib.import_module(f"jaxft.data.{module}"), name)
  assert sorted(n for names in data._NAMES.values() for n in names) == data.__all__
  assert {"load_source", "Dataset", "DataError", "iterate", "augment", "preprocess_eval"} <= set(data.__all__)
  assert data.transforms.mix_batch is not None and "sources" in dir(data)
  with pytest.raises(AttributeError, match="module 'jaxft.data' has no attribute 'nope'"):
    data.nope


# --- bad sources ------------------------------------------------------------------------------------


def test_unknown_scheme_lists_valid_ones():
  with pytest.raises(DataError, match="unknown data source 'imagenet:/x'; valid sources are "
                     "folder:PATH, cifar:PATH, tfds:NAME"):
    data.load_source("imagenet:/x")
  with pytest.raises(DataError, match="unknown data source '/just/a/path'"):
    data.load_source("/just/a/path")


def test_missing_path_is_named(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(DataError, match=f"data path '{missing}' .* does not exist"):
    data.load_source(f"folder:{missing}")
  with pytest.raises(DataError, match=f"data path '{missing}' .* does not exist"):
    data.load_source(f"cifar:{missing}")


def test_tfds_missing_says_how_to_install(monkeypatch):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "tensorflow_datasets":
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(DataError, match=r"needs tensorflow_datasets.*pip install jaxft\[tfds-tf\]"):
    data.load_source("tfds:cifar10", split="test")


def test_tfds_passes_split_and_converts(monkeypatch):
  calls = {}

  class Label:
    names = ["zero", "one"]

  class Info:
    features = {"label": Label()}

  def load(name, split, batch_size, with_info):
    calls.update(name=name, split=split, batch_size=batch_size)
    return {"image": np.full((3, 5, 5, 1), 7, np.uint8), "label": np.array([1, 0, 1])}, Info()

  fake = types.SimpleNamespace(load=load, as_numpy=lambda x: x)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  ds = data.load_source("tfds:mnist", split="test", limit=3)
  assert calls == {"name": "mnist", "split": "test[:3]", "batch_size": -1}
  assert ds.images.shape == (3, 5, 5, 3) and (ds.images == 7).all()  # grayscale -> RGB
  assert ds.labels.tolist() == [1, 0, 1] and ds.class_names == ("zero", "one")


# --- cifar ------------------------------------------------------------------------------------------


def _fake_cifar(dest: Path, as_tar: bool) -> tuple[Path, dict[str, tuple[np.ndarray, list[int]]]]:
  """A tiny archive in the exact CIFAR-10 python format: 2 train batches of 3 and a test batch of 2."""
  rng = np.random.default_rng(1)
  blobs, batches = {}, {}
  for name, n in (("data_batch_1", 3), ("data_batch_2", 3), ("test_batch", 2)):
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 3, n).tolist()
    batches[name] = (rows, labels)
    blobs[name] = pickle.dumps({b"batch_label": name.encode(), b"data": rows, b"labels": labels})
  blobs["batches.meta"] = pickle.dumps({b"label_names": [b"plane", b"car", b"bird"],
                                        b"num_vis": 3072})
  if as_tar:
    path = dest / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
      for name, blob in blobs.items():
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
  else:
    path = dest / "cifar-10-batches-py"
    path.mkdir()
    for name, blob in blobs.items():
      (path / name).write_bytes(blob)
  return path, batches


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar_archive(tmp_path, as_tar):
  path, batches = _fake_cifar(tmp_path, as_tar)
  train = data.load_source(f"cifar:{path}", cache_dir=False)
  assert train.class_names == ("plane", "car", "bird")
  assert train.images.shape == (6, 32, 32, 3) and train.images.dtype == np.uint8
  assert train.labels.tolist() == batches["data_batch_1"][1] + batches["data_batch_2"][1]
  row = batches["data_batch_2"][0][0]
  # Channel-major rows: pixel (y, x) of channel c is row[c * 1024 + y * 32 + x].
  assert train.images[3, 5, 7].tolist() == [row[5 * 32 + 7], row[1024 + 5 * 32 + 7],
                                            row[2048 + 5 * 32 + 7]]
  test = data.load_source(f"cifar:{path}", split="test", cache_dir=False)
  assert len(test) == 2 and test.labels.tolist() == batches["test_batch"][1]
  assert len(data.load_source(f"cifar:{path}", limit=4, cache_dir=False)) == 4
  assert data.load_source(f"cifar:{path}", image_size=16, cache_dir=False).images.shape[1:] == (16, 16, 3)
  with pytest.raises(DataError, match="CIFAR split must be 'train' or 'test', got 'val'"):
    data.load_source(f"cifar:{path}", split="val", cache_dir=False)
  # The parent folder of the archive / batches folder works too.
  assert len(data.load_source(f"cifar:{tmp_path}", cache_dir=False)) == 6


class _Py2Pickler(pickle._Pickler):
  """Writes str and bytes as Python 2 byte strings (BINSTRING), as the real CIFAR-10 archive was written."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_py2_str(self, obj):
    b = obj if isinstance(obj, bytes) else obj.encode()
    self.write((pickle.SHORT_BINSTRING + bytes([len(b)])) if len(b) < 256
               else (pickle.BINSTRING + len(b).to_bytes(4, "little")))
    self.write(b)
    self.memoize(obj)

  dispatch[bytes] = dispatch[str] = _save_py2_str


def test_cifar_python2_pickles(tmp_path):
  # The real archive's batches are Python 2 pickles: byte strings for the keys, the dtype name and the
  # array bytes (read with encoding="bytes"); the restricted unpickler reads them as plain pickle does.
  (tmp_path / "ref").mkdir()
  ref, _ = _fake_cifar(tmp_path / "ref", as_tar=False)
  d = tmp_path / "py2" / "cifar-10-batches-py"
  d.mkdir(parents=True)
  for f in ref.iterdir():
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(pickle.loads(f.read_bytes()))
    assert b"_codecs" not in buf.getvalue()
    (d / f.name).write_bytes(buf.getvalue())
  want = data.load_source(f"cifar:{ref}", cache_dir=False)
  got = data.load_source(f"cifar:{d}", cache_dir=False)
  np.testing.assert_array_equal(got.images, want.images)
  assert got.labels.tolist() == want.labels.tolist() and got.class_names == want.class_names


def test_cifar_not_an_archive(tmp_path):
  with pytest.raises(DataError, match="is not a CIFAR-10 python archive"):
    data.load_source(f"cifar:{tmp_path}", cache_dir=False)
  junk = tmp_path / "cifar-10-python.tar.gz"
  junk.write_bytes(b"junk")
  with pytest.raises(DataError, match=f"cannot read CIFAR archive '{junk}'"):
    data.load_source(f"cifar:{junk}", cache_dir=False)


# --- cache ------------------------------------------------------------------------------------------


def _no_decode(*_args, **_kwargs):
  raise AssertionError("decoded although the cache should have been used")


def test_cache_hit_skips_decoding_and_change_invalidates(tmp_path, monkeypatch):
  _write_folder(tmp_path / "d", per_class=2)
  cache = tmp_path / "cache"
  first = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=cache)
  assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))
  with monkeypatch.context() as m:
    m.setattr(decode, "decode_image", _no_decode)
    again = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=cache)
  np.testing.assert_array_equal(again.images, first.images)
  np.testing.assert_array_equal(again.labels, first.labels)
  assert again.class_names == first.class_names
  # A different image_size is a different key.
  assert data.load_source(f"folder:{tmp_path / 'd'}", image_size=4, cache_dir=cache).images.shape[1] == 4
  # Changing one file (size/mtime) invalidates the cache: the new pixels are decoded.
  new_px = np.full((6, 8, 3), 9, np.uint8)
  target = tmp_path / "d" / "ant" / "001.png"
  Image.fromarray(new_px).save(target)
  os.utime(target, ns=(1, 1))
  changed = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=cache)
  np.testing.assert_array_equal(changed.images[1], new_px)


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, monkeypatch):
  _write_folder(tmp_path / "d", per_class=1)
  cache = tmp_path / "cache"
  first = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=cache)
  (cache_file,) = cache.glob("*.npz")
  cache_file.write_bytes(cache_file.read_bytes()[:100])
  again = data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=cache)
  np.testing.assert_array_equal(again.images, first.images)
  with monkeypatch.context() as m:  # rewritten: now a hit again
    m.setattr(decode, "decode_image", _no_decode)
    data.load_source(f"folder:{tmp_path / 'd'}", cache_dir=cache)


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
  _write_folder(tmp_path / "d", per_class=1)
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "envcache"))
  data.load_source(f"folder:{tmp_path / 'd'}")
  assert len(list((tmp_path / "envcache").glob("folder-d-*.npz"))) == 1


# --- split ------------------------------------------------------------------------------------------


def test_split_train_val_deterministic_disjoint_stratified():
  ds = _ds(n_per_class=10, num_classes=3)
  train, val = data.split_train_val(ds, 0.2, seed=3)
  train2, val2 = data.split_train_val(ds, 0.2, seed=3)
  np.testing.assert_array_equal(val.images, val2.images)
  np.testing.assert_array_equal(train.images, train2.images)
  assert len(train) == 24 and len(val) == 6
  assert np.bincount(val.labels).tolist() == [2, 2, 2]
  key = lambda d: {im.tobytes() for im in d.images}
  assert not key(train) & key(val) and len(key(train) | key(val)) == len(ds)
  _, val_other = data.split_train_val(ds, 0.2, seed=4)
  assert key(val_other) != key(val)
  _, empty = data.split_train_val(ds, 0.0, seed=0)
  assert len(empty) == 0
  with pytest.raises(ValueError, match="val_fraction must be in \\[0, 1\\), got 1.0"):
    data.split_train_val(ds, 1.0, seed=0)


# --- batching ---------------------------------------------------------------------------------------


def test_batch_indices_resume_equivalence():
  n, bs, seed, k = 23, 5, 7, 6  # 4 steps per epoch, so steps k..2k cross epoch boundaries
  fresh = [data.batch_indices(n, bs, seed, s) for s in range(2 * k + 1)]
  pipeline._permutation.cache_clear()  # a "resumed" process starts with nothing cached
  resumed = [data.batch_indices(n, bs, seed, s) for s in range(k, 2 * k + 1)]
  for a, b in zip(fresh[k:], resumed):
    np.testing.assert_array_equal(a, b)
  epoch0 = np.concatenate(fresh[:4])
  assert len(set(epoch0.tolist())) == 20  # no repeats inside an epoch; 3 dropped
  np.testing.assert_array_equal(epoch0, data.epoch_permutation(n, seed, 0)[:20])
  assert not np.array_equal(fresh[0], fresh[4])  # next epoch reshuffled
  with pytest.raises(DataError, match="batch_size 30 is larger than the dataset \\(23 examples\\)"):
    data.batch_indices(n, 30, seed, 0)


def test_iterate_matches_batch_indices_and_resumes():
  ds = _ds(n_per_class=4, num_classes=3)
  full = list(data.iterate(ds, batch_size=4, seed=1, start_step=0, num_steps=7))
  with data.iterate(ds, batch_size=4, seed=1, start_step=3, num_steps=4) as it:
    resumed = list(it)
    assert it.wait_seconds >= 0.0
  assert [s for s, *_ in full] == list(range(7))
  for (s, im, lab), (s2, im2, lab2) in zip(full[3:], resumed):
    assert s == s2
    np.testing.assert_array_equal(im, im2)
    np.testing.assert_array_equal(lab, lab2)
  step, im, lab = full[5]
  idx = np.sort(data.batch_indices(len(ds), 4, 1, 5))
  np.testing.assert_array_equal(im, ds.images[idx])
  np.testing.assert_array_equal(lab, ds.labels[idx])


def test_prefetcher_reraises_and_closes():
  def produce(step):
    if step == 2:
      raise RuntimeError("boom at 2")
    return step

  it = data.Prefetcher(produce, range(5))
  assert next(it) == 0 and next(it) == 1
  with pytest.raises(RuntimeError, match="boom at 2"):
    next(it)
  endless = data.iterate(_ds(2, 2), batch_size=2, seed=0)
  next(endless)
  endless.close()
  assert not endless._thread.is_alive()
  with pytest.raises(StopIteration):
    next(endless)


# --- real data ---------------------------------------------------------------------------------------


def test_real_cifar_folder(cifar_folder, tmp_path):
  ds = data.load_source(f"folder:{cifar_folder}", cache_dir=tmp_path / "cache")
  assert len(ds) == 1000 and ds.images.shape == (1000, 32, 32, 3)
  assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck")
  assert np.bincount(ds.labels).tolist() == [100] * 10
  # Real photos: varied, not blank.
  assert 60 < ds.images.mean() < 200 and ds.images.std() > 30
  train, val = data.split_train_val(ds, 0.1, seed=0)
  assert np.bincount(val.labels).tolist() == [10] * 10 and len(train) == 900
