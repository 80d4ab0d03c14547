"""Tests for the streaming pipeline (jaxft.data.stream) and the host transforms
(jaxft.data.host_transforms): geometry, determinism, resume, sharding, memory, bad data."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft.data import DataError, host_transforms as ht, pipeline, sources, stream


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


def _gradient(width: int, height: int) -> np.ndarray:
  """R = x, G = y, B = 0: a pixel's value says where it came from."""
  x = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :], (height, width))
  y = np.broadcast_to(np.arange(height, dtype=np.uint8)[:, None], (height, width))
  return np.ascontiguousarray(np.stack([x, y, np.zeros_like(x)], -1))


def _write_folder(root: Path, per_class: int = 6, classes=("ant", "bee"), fmt: str = "png") -> Path:
  """Variable-size random images in ``root/<class>/``."""
  rng = np.random.default_rng(0)
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      px = rng.integers(0, 256, (20 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8)
      Image.fromarray(px).save(root / c / f"{i:02d}.{fmt}")
  return root


def _batches(ds, start: int, n: int, **kw) -> list[tuple[int, np.ndarray, np.ndarray]]:
  with stream.StreamIterator(ds, start_step=start, num_steps=n, **kw) as it:
    return list(it)


def _assert_same(a, b) -> None:
  assert [s for s, _, _ in a] == [s for s, _, _ in b]
  for (_, ia, la), (_, ib, lb) in zip(a, b):
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(la, lb)


# --- geometry ------------------------------------------------------------------------------------------


def test_random_resized_crop_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  width, height, scale, ratio = 300, 200, (0.25, 0.6), (0.5, 2.0)
  areas, ratios = [], []
  for _ in range(2000):
    l, t, r, b = ht.random_resized_crop_box(rng, width, height, scale, ratio)
    assert 0 <= l < r <= width and 0 <= t < b <= height
    w, h = r - l, b - t
    areas.append(w * h / (width * height))
    ratios.append(w / h)
  # Rounding w and h to whole pixels moves the area and ratio by under 1%.
  assert min(areas) >= scale[0] * 0.99 and max(areas) <= scale[1] * 1.01
  assert min(ratios) >= ratio[0] * 0.99 and max(ratios) <= ratio[1] * 1.01
  assert min(areas) < 0.3 and max(areas) > 0.55  # the range is covered, not one value
  assert min(ratios) < 0.6 and max(ratios) > 1.8


def test_random_resized_crop_falls_back_to_a_centred_clamped_box():
  # No box of >= 90% of a 1000x10 image has ratio <= 4/3: the centred box with ratio 4/3 and full height.
  box = ht.random_resized_crop_box(np.random.default_rng(0), 1000, 10, (0.9, 1.0))
  assert box == (493, 0, 506, 10)


def test_train_transform_samples_the_drawn_box():
  img = _gradient(200, 120)
  box = ht.random_resized_crop_box(np.random.default_rng(3), 200, 120, (0.2, 0.5))
  out = ht.train_transform(img, np.random.default_rng(3), 16, (0.2, 0.5), flip=False)
  l, t, r, b = box
  centres_x = l + (np.arange(16) + 0.5) * (r - l) / 16 - 0.5
  centres_y = t + (np.arange(16) + 0.5) * (b - t) / 16 - 0.5
  np.testing.assert_allclose(out[8, :, 0], centres_x, atol=1.01)
  np.testing.assert_allclose(out[:, 8, 1], centres_y, atol=1.01)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_train_transform_flips_half_the_time():
  img = _gradient(64, 64)
  flipped = [ht.train_transform(img, np.random.default_rng(s), 8, (1.0, 1.0), (1.0, 1.0))[0, 0, 0] > 32
             for s in range(200)]
  assert 70 < sum(flipped) < 130
  never = [ht.train_transform(img, np.random.default_rng(s), 8, (1.0, 1.0), (1.0, 1.0), flip=False)
           for s in range(20)]
  assert all(n[0, 0, 0] < 32 for n in never)


def test_eval_crop_pct_is_exact_on_a_known_image():
  img = _gradient(100, 100)
  # floor(50 / 0.5) = 100: no resize, a centre crop of 50 — pixel for pixel.
  np.testing.assert_array_equal(ht.eval_transform(img, 50, crop_pct=0.5), img[25:75, 25:75])
  # 200x100, size 32, crop_pct 0.875: shorter side to floor(32 / 0.875) = 36, so the crop covers
  # 32 * 100 / 36 = 88.9 source pixels, centred.
  out = ht.eval_transform(_gradient(200, 100), 32, crop_pct=0.875)
  side = 32 * 100 / 36
  left, top = (200 - side) / 2, (100 - side) / 2
  centres = (np.arange(32) + 0.5) * side / 32 - 0.5
  np.testing.assert_allclose(out[16, :, 0], left + centres, atol=1.01)
  np.testing.assert_allclose(out[:, 16, 1], top + centres, atol=1.01)
  assert ht.center_crop_box(200, 100, 32, 0.875) == pytest.approx((left, top, left + side, top + side))


def test_jpeg_draft_decoding_matches_full_decoding(tmp_path):
  big = np.asarray(Image.fromarray(_gradient(256, 192)).resize((1024, 768), Image.BILINEAR))
  Image.fromarray(big).save(tmp_path / "x.jpg", quality=95)
  fast = ht.eval_transform(tmp_path / "x.jpg", 32, 1.0, draft=True)
  full = ht.eval_transform(tmp_path / "x.jpg", 32, 1.0, draft=False)
  assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.0
  with Image.open(tmp_path / "x.jpg") as im:  # draft really decodes fewer pixels for this crop
    im.draft("RGB", (32, 32))
    assert im.size == (128, 96)


# --- the pipeline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
  return _write_folder(tmp_path_factory.mktemp("stream") / "d")


def _train(src, batch_size=4, seed=1, size=12, **kw):
  return stream.train_dataset(src, stream.StreamOptions(size=size), batch_size=batch_size, seed=seed,
                              process_index=kw.pop("p", 0), process_count=kw.pop("count", 1), **kw)


def test_batches_are_the_in_memory_pipelines_examples(folder):
  src = stream.open_folder(f"folder:{folder}")
  assert len(src) == 12 and src.class_names == ("ant", "bee")
  got = _batches(_train(src), 0, 7)  # 3 steps per epoch: crosses two epoch boundaries
  for step, images, labels in got:
    idx = np.sort(pipeline.batch_indices(12, 4, 1, step))
    np.testing.assert_array_equal(labels, src.labels[idx])
    assert images.shape == (4, 12, 12, 3) and images.dtype == np.uint8 and labels.dtype == np.int32


def test_array_source_gives_the_same_batches_as_files(folder):
  files = stream.open_folder(f"folder:{folder}")
  decoded = [np.asarray(Image.open(p).convert("RGB")) for p in files.paths]
  arrays = _ArrayList(decoded, files.labels, files.class_names)
  _assert_same(_batches(_train(files), 2, 3), _batches(_train(arrays), 2, 3))


class _ArrayList(stream.ArraySource):
  """An ArraySource over images of different sizes (a list), as decoded files are."""

  def item(self, i):
    return self.images[i], int(self.labels[i])


def test_restore_mid_epoch_gives_the_same_next_batches(folder):
  src = stream.open_folder(f"folder:{folder}")
  ds = _train(src)
  whole = _batches(ds, 0, 6)
  with stream.StreamIterator(ds, 0) as it:
    for _ in range(4):
      next(it)
    state = it.get_state()
  assert state == {"step": 4}
  _assert_same(_batches(ds, state["step"], 2), whole[4:])
  assert not np.array_equal(whole[0][1], _batches(_train(src, seed=2), 0, 1)[0][1])  # seed matters


@pytest.mark.slow  # starts two grain worker processes (~10 s on 2 cores)
def test_same_batches_whatever_the_worker_and_thread_count(folder):
  src = stream.open_folder(f"folder:{folder}")
  ds = _train(src)
  one = _batches(ds, 1, 4, num_threads=0)
  _assert_same(one, _batches(ds, 1, 4, num_threads=3))
  _assert_same(one, _batches(ds, 1, 4, num_workers=2))


def test_hosts_split_the_global_batch(folder):
  src = stream.open_folder(f"folder:{folder}")
  whole = _batches(_train(src), 0, 4)
  halves = [_batches(_train(src, p=p, count=2), 0, 4) for p in (0, 1)]
  for (s, im, lab), (_, im0, lab0), (_, im1, lab1) in zip(whole, *halves):
    np.testing.assert_array_equal(im, np.concatenate([im0, im1]))
    np.testing.assert_array_equal(lab, np.concatenate([lab0, lab1]))
  with pytest.raises(DataError, match="batch_size 4 is not divisible by the 3 hosts"):
    _train(src, p=0, count=3)


def test_eval_dataset_covers_every_example_once_in_order(folder):
  src = stream.open_folder(f"folder:{folder}")
  ds = stream.eval_dataset(src, stream.StreamOptions(size=8, train=False), batch_size=5,
                           process_index=0, process_count=1)
  batches = list(ds)
  assert [len(b["label"]) for b in batches] == [5, 5, 5]  # the last padded: one shape for every batch
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:12], src.labels)
  assert (labels[12:] == -1).all() and not batches[-1]["image"][2:].any()
  first = ht.eval_transform(src.paths[0], 8)
  np.testing.assert_array_equal(batches[0]["image"][0], first)


def test_memory_is_bounded_by_buffers_not_by_the_dataset(tmp_path):
  import cloudpickle  # grain's way of sending the pipeline to each worker

  small = _write_folder(tmp_path / "small", per_class=4)
  big = tmp_path / "big"
  for c in ("ant", "bee"):
    (big / c).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(np.full((400, 500, 3), i, np.uint8)).save(big / c / f"{i}.png")
  sizes = [len(cloudpickle.dumps(_train(stream.open_folder(f"folder:{d}")))) for d in (small, big)]
  # What a worker receives is paths and labels: it does not grow with the pixels (2 x 4 x 600 kB here).
  assert abs(sizes[0] - sizes[1]) < 200 and sizes[1] < 10_000
  assert stream.buffered_batches(0, 2, 2) == 4 and stream.buffered_batches(4, 2, 2) == 24


def test_import_jaxft_data_does_not_import_grain():
  code = "import sys, jaxft.data; jaxft.data.stream; print('grain' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_bad_options_and_sources_are_clear_errors(folder, tmp_path):
  with pytest.raises(DataError, match=r"scale must satisfy 0 < lo <= hi <= 1, got \(0.5, 0.2\); "
                                      r"crop_pct must be in \(0, 1\], got 1.5"):
    stream.StreamOptions(size=8, scale=(0.5, 0.2), crop_pct=1.5)
  src = stream.open_folder(f"folder:{folder}")
  with pytest.raises(DataError, match="batch_size 13 is larger than the dataset"):
    _train(src, batch_size=13)
  with pytest.raises(DataError, match="the streaming pipeline lists folders only"):
    stream.open_folder("cifar:/x")
  with pytest.raises(DataError, match="is not a directory"):
    stream.open_folder(f"folder:{tmp_path / 'nope'}")


def test_missing_grain_is_one_clear_error(folder, monkeypatch):
  src = stream.open_folder(f"folder:{folder}")
  monkeypatch.setitem(sys.modules, "grain", None)  # import grain → ImportError
  with pytest.raises(DataError, match=r"needs grain, which is not installed; pip install 'jaxft\[stream\]'"):
    _train(src)


# --- bad data --------------------------------------------------------------------------------------------


def _bad_folder(root: Path) -> tuple[Path, list[Path]]:
  _write_folder(root, per_class=3, fmt="jpg")
  good = (root / "ant" / "00.jpg").read_bytes()
  bad = [root / "ant" / "corrupt.jpg", root / "ant" / "truncated.jpg", root / "bee" / "empty.png",
         root / "bee" / "text.png"]
  bad[0].write_bytes(good[:200] + bytes(range(256)) * 4)
  bad[1].write_bytes(good[: len(good) // 2])
  bad[2].write_bytes(b"")
  bad[3].write_text("not an image")
  (root / "bee" / "notes.txt").write_text("ignored, and counted in the log")
  return root, bad


def test_unreadable_files_stop_the_load_with_their_list(tmp_path):
  root, bad = _bad_folder(tmp_path / "d")
  with pytest.raises(DataError) as e:
    stream.open_folder(f"folder:{root}")
  msg = str(e.value)
  assert msg.startswith("4 unreadable image file(s) under")
  assert all(str(p) in msg for p in bad) and "set data.skip_corrupt=True" in msg


def test_unreadable_files_are_skipped_counted_and_logged(tmp_path, caplog):
  root, bad = _bad_folder(tmp_path / "d")
  caplog.set_level(logging.WARNING)
  src = stream.open_folder(f"folder:{root}", skip_corrupt=True)
  assert len(src) == 6 and sorted(p for p, _ in src.skipped) == sorted(map(str, bad))
  warnings = " ".join(r.getMessage() for r in caplog.records)
  assert "skipped 4 unreadable image file(s)" in warnings and str(bad[0]) in warnings
  assert "ignored 1 file(s) without an image extension" in warnings and "notes.txt" in warnings
  assert len(_batches(_train(src, batch_size=6), 0, 2)) == 2  # what is left streams


def test_the_file_check_is_cached_until_a_file_changes(tmp_path, monkeypatch):
  root, bad = _bad_folder(tmp_path / "d")
  first = stream.open_folder(f"folder:{root}", skip_corrupt=True)
  assert list((tmp_path / "cache").glob("scan-d-*.json"))
  calls = []
  real = stream.scan_files
  monkeypatch.setattr(stream, "scan_files", lambda paths, n=0: calls.append(len(paths)) or real(paths, n))
  again = stream.open_folder(f"folder:{root}", skip_corrupt=True)
  assert calls == [] and again.paths == first.paths and again.skipped == first.skipped  # from the cache
  good = (root / "ant" / "00.jpg").read_bytes()
  bad[2].write_bytes(good)  # the empty file is now a good image: its size changed
  fixed = stream.open_folder(f"folder:{root}", skip_corrupt=True)
  assert calls == [10] and len(fixed) == 7 and len(fixed.skipped) == 3
  stream.open_folder(f"folder:{root}", skip_corrupt=True, cache_dir=False)
  assert calls == [10, 10]


def test_a_file_that_breaks_after_the_check_is_a_clear_error(tmp_path):
  root = _write_folder(tmp_path / "d", per_class=2)
  src = stream.open_folder(f"folder:{root}")
  for p in src.paths:
    Path(p).write_bytes(b"")
  with pytest.raises(DataError, match="it changed after it was checked"):
    _batches(_train(src, batch_size=2), 0, 1)


_GREY = np.array([[0, 1, 77, 128], [200, 254, 255, 9]], np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_every_mode_streams_as_rgb(tmp_path, mode):
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
  rgb = np.stack([_GREY, _GREY[::-1], 255 - _GREY], -1)
  if mode == "L":
    im, want, ext = Image.fromarray(_GREY, "L"), np.repeat(_GREY[..., None], 3, -1), "png"
  elif mode == "RGBA":
    im, want, ext = Image.fromarray(np.dstack([rgb, np.full_like(_GREY, 7)]), "RGBA"), rgb, "png"
  elif mode == "P":
    im, want, ext = Image.fromarray(rgb).quantize(256), None, "png"
    want = np.asarray(im.convert("RGB"))
  elif mode == "I;16":
    sixteen = _GREY.astype(np.uint16) * 257
    im, want, ext = Image.fromarray(sixteen), np.repeat(_GREY[..., None], 3, -1), "png"
  else:
    im, want, ext = Image.fromarray(rgb).convert("CMYK"), rgb, "jpg"
  for c in ("a", "b"):
    im.save(tmp_path / c / f"x.{ext}", **({"quality": 100} if ext == "jpg" else {}))
  src = stream.open_folder(f"folder:{tmp_path}")
  with Image.open(src.paths[0]) as check:
    assert check.mode == mode
  ds = stream.eval_dataset(src, stream.StreamOptions(size=4, train=False, crop_pct=1.0), batch_size=2,
                           process_index=0, process_count=1)
  got = next(iter(ds))["image"][0]
  # A 4x2 image, centre-cropped to 2x2 then resized to 4x4: compare with the same geometry on RGB.
  ref = ht.eval_transform(np.ascontiguousarray(want), 4, crop_pct=1.0)
  tol = 12 if mode == "CMYK" else 0  # CMYK goes through JPEG
  np.testing.assert_allclose(got.astype(int), ref.astype(int), atol=tol)


def test_empty_class_folder_and_single_class_are_errors(tmp_path):
  root = _write_folder(tmp_path / "d", per_class=2)
  (root / "cow").mkdir()
  with pytest.raises(DataError, match=r"class folder\(s\) \['cow'\] under .* hold no image files"):
    stream.open_folder(f"folder:{root}")
  with pytest.raises(DataError, match=r"class folder\(s\) \['cow'\]"):
    sources.load_source(f"folder:{root}", cache_dir=False)
  one = _write_folder(tmp_path / "one", per_class=2, classes=("ant",))
  with pytest.raises(DataError, match=r"has a single class \(\['ant'\]\); a classifier needs two"):
    _train(stream.open_folder(f"folder:{one}"), batch_size=2)


def test_class_left_empty_by_skipping_is_an_error(tmp_path):
  root = _write_folder(tmp_path / "d", per_class=2)
  for p in (root / "bee").iterdir():
    p.write_bytes(b"")
  with pytest.raises(DataError, match=r"class folder\(s\) \['bee'\] .* hold no readable image"):
    stream.open_folder(f"folder:{root}", skip_corrupt=True)


# --- training on the stream ---------------------------------------------------------------------------


def test_stream_config_is_checked_before_anything_loads():
  from jaxft import config as config_lib, validate

  c = config_lib.default_config()
  c.data.source = "sklearn:digits"
  c.model.arch = "cifar_resnet8"
  c.data.pipeline = "stream"
  c.data.scale = (0.9, 0.2)
  c.data.ratio = (0.5,)
  problems = validate.validate(c, check_files=False)
  assert "config.data.scale = (0.9, 0.2): must be a pair (lo, hi) with lo <= hi" in problems
  assert any(p.startswith("config.data.ratio = (0.5,): must be a pair (lo, hi) of numbers") for p in problems)
  c.data.scale, c.data.ratio = (0.2, 0.9), (0.5, 2.0)
  assert validate.validate(c, check_files=False) == [
      "config.data.image_size = 0: must be > 0 (the side of the crops it makes) when "
      "config.data.pipeline = 'stream'"]
  c.data.image_size, c.data.per_class = 32, 5  # not silently ignored by the stream
  assert validate.validate(c, check_files=False) == [
      "config.data.per_class = 5: only the in-memory pipeline takes it "
      "(set config.data.pipeline = 'memory', or data.per_class = 0)"]


@pytest.mark.slow  # one tiny training run (~20 s on 2 cores); exact resume: test_train_crash.py
def test_training_streams_the_folder(tmp_path):
  import json
  from tests.test_train import tiny_config, write_folder
  from jaxft import train

  folder = write_folder(tmp_path / "data", size=40)  # 40 px files, 32 px crops: cropped on the host
  kw = {"data.pipeline": "stream", "data.image_size": 32, "data.scale": (0.5, 1.0), "train.num_steps": 2}
  result = train.train_and_evaluate(tiny_config(folder, tmp_path, **kw), tmp_path / "run")
  assert result["step"] == 2 and result["n"] == 6
  identity = json.loads((tmp_path / "run" / "data.json").read_text())
  assert identity["train"]["image_shape"] is None and identity["train"]["n"] == 18  # files, streamed
  assert identity["val"]["image_shape"] == [32, 32, 3]  # the eval transform's crops


def _stream_config(folder: Path, tmp: Path, **overrides):
  from tests.test_train import tiny_config
  return tiny_config(folder, tmp, **{"data.pipeline": "stream", "data.image_size": 16, **overrides})


def test_run_data_on_the_stream_is_checked_before_training(tmp_path):
  from jaxft.train import setup
  from jaxft.train.errors import TrainError

  root = _write_folder(tmp_path / "d", per_class=4)
  train, val = setup.load_data(_stream_config(root, tmp_path))
  assert isinstance(train, stream.FileSource) and (len(train), len(val)) == (6, 2)
  assert val.held is None and sorted(val.labels.tolist()) == [0, 1]  # 'stream' streams val too
  assert [b.shape for b in val.local_batches(2)] == [(2, 16, 16, 3)]
  (root / "bee" / "00.png").write_bytes(b"")
  with pytest.raises(TrainError, match=r"^1 unreadable image file\(s\) under .*00.png"):
    setup.load_data(_stream_config(root, tmp_path))
  train, _ = setup.load_data(_stream_config(root, tmp_path, **{"data.skip_corrupt": True}))
  assert len(train) == 5 and len(train.skipped) == 1
  one = _write_folder(tmp_path / "one", per_class=4, classes=("ant",))
  with pytest.raises(TrainError, match="has a single class"):
    setup.load_data(_stream_config(one, tmp_path))
