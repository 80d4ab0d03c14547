"""data.pipeline='auto' (a folder held decoded, jaxft.data.decoded: the same batches as streaming its
files), streamed validation (stream.EvalSet) and per-host batches in the train loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft.data import DataError, decoded, pipeline, stream


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


def _photos(root: Path, per_class: int = 5) -> Path:
  """JPEGs of varied sizes, some large enough (both sides >= 2 x 12 px) for draft decoding to shrink."""
  rng = np.random.default_rng(3)
  sizes = [(14, 30), (40, 22), (60, 50), (13, 13), (31, 80)]
  for c in ("ant", "bee"):
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      w, h = sizes[i % len(sizes)]
      smooth = np.kron(rng.integers(0, 256, (h // 2 + 1, w // 2 + 1, 3)), np.ones((2, 2, 1)))[:h, :w]
      Image.fromarray(smooth.astype(np.uint8)).save(root / c / f"{i:02d}.jpg", quality=90)
  return root


def _batches(source, size=12, steps=3, batch_size=4, p=0, count=1, **opt):
  ds = stream.train_dataset(source, stream.StreamOptions(size=size, **opt), batch_size=batch_size,
                            seed=5, process_index=p, process_count=count)
  with stream.StreamIterator(ds, 1, steps) as it:
    return list(it)


def _assert_same(a, b):
  assert len(a) == len(b)
  for (sa, ia, la), (sb, ib, lb) in zip(a, b):
    assert sa == sb
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(la, lb)


def test_scan_records_every_image_size(tmp_path):
  src = stream.open_folder(f"folder:{_photos(tmp_path / 'd')}")
  for path, (w, h) in zip(src.paths, src.sizes):
    assert Image.open(path).size == (w, h)
  assert src.subset([3, 1]).sizes.tolist() == [src.sizes[3].tolist(), src.sizes[1].tolist()]


def test_decoded_source_gives_the_files_batches_bit_for_bit(tmp_path):
  files = stream.open_folder(f"folder:{_photos(tmp_path / 'd')}")
  held = decoded.decode_source(files, 12)
  drafted = decoded.may_draft(files.sizes, 12)
  assert drafted.any() and not drafted.all()  # both kinds: held decoded, and kept as files
  assert all(isinstance(held.item(i)[0], str) == bool(d) for i, d in enumerate(drafted))
  _assert_same(_batches(files), _batches(held))
  _assert_same(_batches(files, augment="trivial"), _batches(held, augment="trivial"))
  opts = stream.StreamOptions(size=12, train=False)
  np.testing.assert_array_equal(stream.eval_arrays(files, opts).images, stream.eval_arrays(held, opts).images)
  assert held.fingerprint() == files.fingerprint()  # a workdir sees the same data on either path
  # Holding a large image decoded would change its pixels (draft decoding): that is why it stays a file.
  big = int(np.flatnonzero(drafted)[0])
  full = np.asarray(Image.open(files.paths[big]).convert("RGB"))
  crop = lambda x: stream.host_transforms.eval_transform(x, 12, 1.0)
  assert not np.array_equal(crop(files.paths[big]), crop(full))


def test_the_decoded_store_is_written_once_and_mapped_after(tmp_path, monkeypatch):
  files = stream.open_folder(f"folder:{_photos(tmp_path / 'd')}")
  first = decoded.decode_source(files, 12)
  assert Path(first.store.path).stat().st_size == decoded.decoded_bytes(files.sizes, 12)
  monkeypatch.setattr(decoded, "_write_store", lambda *a: pytest.fail("decoded again"))
  again = decoded.decode_source(files, 12)
  assert again.store.path == first.store.path
  import cloudpickle  # what grain sends each worker: the path and offsets, not the pixels
  assert len(cloudpickle.dumps(again)) < 4000 < decoded.decoded_bytes(files.sizes, 12)


def test_decode_source_refusals_are_clear_errors(tmp_path):
  files = stream.open_folder(f"folder:{_photos(tmp_path / 'd')}")
  with pytest.raises(DataError, match="needs a FileSource listed by open_folder"):
    decoded.decode_source(stream.FileSource(files.paths, files.labels, files.class_names), 12)
  with pytest.raises(DataError, match="cache_dir=False turns that off: stream the files instead"):
    decoded.decode_source(files, 12, cache_dir=False)
  Path(files.paths[0]).write_bytes(b"not a jpeg")
  with pytest.raises(DataError, match="no longer decodes .*rerun, which checks the folder again"):
    decoded.decode_source(files, 12)


def _config(folder: Path, tmp: Path, **kw):
  from tests.test_train import tiny_config
  return tiny_config(folder, tmp, **{"data.image_size": 12, "data.val_fraction": 0.2, **kw})


def test_auto_holds_small_data_streams_large_and_the_batches_agree(tmp_path):
  from jaxft.train import setup

  folder = _photos(tmp_path / "d")
  held_train, held_val = setup.load_data(_config(folder, tmp_path, **{"data.pipeline": "auto"}))
  assert isinstance(held_train, decoded.DecodedSource) and held_val.held is not None
  tight = {"data.pipeline": "auto", "data.memory_mb": 0}
  files_train, files_val = setup.load_data(_config(folder, tmp_path, **tight))
  assert isinstance(files_train, stream.FileSource) and files_val.held is None
  c = _config(folder, tmp_path, **{"data.pipeline": "auto"})
  a = list(setup.train_batches(c, held_train, 0, 3, hosts=(0, 1)))
  b = list(setup.train_batches(c, files_train, 0, 3, hosts=(0, 1)))
  _assert_same(a, b)
  for x, y in zip(held_val.local_batches(3), files_val.local_batches(3)):
    np.testing.assert_array_equal(x, y)
  assert held_val.fingerprint() == files_val.fingerprint()


def test_eval_set_held_or_streamed_gives_each_host_its_rows(tmp_path):
  src = stream.open_folder(f"folder:{_photos(tmp_path / 'd')}")  # 10 examples
  opts = stream.StreamOptions(size=12, train=False)
  streamed = stream.EvalSet(src, opts)
  held = stream.EvalSet(src, opts, held=stream.eval_arrays(src, opts))
  whole = list(streamed.local_batches(4))
  assert [len(b) for b in whole] == [4, 4, 4] and not whole[-1][2:].any()  # padded to one shape
  for p in (0, 1):
    for w, s, h in zip(whole, streamed.local_batches(4, p, 2), held.local_batches(4, p, 2)):
      np.testing.assert_array_equal(s, w[2 * p:2 * p + 2])
      np.testing.assert_array_equal(h, s)
  assert stream.eval_positions(10, 4, 1, 2).tolist() == [2, 3, 6, 7, 10, 11]


def test_eval_logits_of_a_streamed_set_equal_the_held_arrays(tmp_path):
  import jax
  from jaxft.train import evaluation
  from jaxft.train.mesh import DataMesh

  src = stream.open_folder(f"folder:{_photos(tmp_path / 'd')}")
  opts = stream.StreamOptions(size=12, train=False)
  arrays = stream.eval_arrays(src, opts)
  fn = jax.jit(lambda v, x: {"head": x.astype("float32").mean(axis=(1, 2)) * v})
  mesh = DataMesh.create(4)
  a = evaluation.eval_logits(fn, 2.0, arrays.images, 4, mesh)["head"]
  b = evaluation.eval_logits(fn, 2.0, stream.EvalSet(src, opts), 4, mesh)["head"]
  assert a.shape == (10, 3)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pipe", ["memory", "stream"])
def test_host_p_of_P_gets_the_pth_slice_of_the_one_host_batch(tmp_path, pipe):
  from jaxft.train import setup

  folder = _photos(tmp_path / "d", per_class=6)
  c = _config(folder, tmp_path, **{"data.pipeline": pipe, "train.batch_size": 4})
  train, _ = setup.load_data(c)
  one = list(setup.train_batches(c, train, 2, 3, hosts=(0, 1)))
  for count in (2, 4):
    parts = [list(setup.train_batches(c, train, 2, 3, hosts=(p, count))) for p in range(count)]
    for k, (step, images, labels) in enumerate(one):
      assert all(part[k][0] == step for part in parts)
      np.testing.assert_array_equal(np.concatenate([part[k][1] for part in parts]), images)
      np.testing.assert_array_equal(np.concatenate([part[k][2] for part in parts]), labels)
  with pytest.raises(DataError, match="divisible by the 3 hosts"):
    pipeline.iterate(pipeline.Dataset(np.zeros((8, 2, 2, 3), np.uint8), (np.arange(8) % 2).astype(np.int32), ("a", "b")),
                     4, 0, process_index=0, process_count=3)


def test_auto_needs_an_image_size():
  from jaxft import config as config_lib, validate

  c = config_lib.default_config()
  c.data.source, c.model.arch, c.data.pipeline = "sklearn:digits", "cifar_resnet8", "auto"
  assert validate.validate(c, check_files=False) == [
      "config.data.image_size = 0: must be > 0 (the side of the crops it makes) when "
      "config.data.pipeline = 'auto'"]


def test_what_only_the_in_memory_pipeline_supports_is_refused_on_the_stream():
  from jaxft import adapt, config as config_lib, validate

  c = config_lib.default_config()
  c.data.source, c.model.arch, c.model.pretrained = "sklearn:digits", "cifar_resnet8", "x.pth"
  c.data.pipeline, c.data.image_size, c.loss.delta = "stream", 16, 0.1
  assert validate.validate(c, check_files=False) == [
      "config.loss.delta = 0.1: only the in-memory pipeline takes it (set config.data.pipeline = "
      "'memory', or loss.delta = 0)"]
  c.loss.delta, c.optim.weight_decay = 0.0, adapt.adaptive(1e-5, 1e-2, 0.1)
  assert "config.optim.weight_decay is adaptive: only the in-memory pipeline supports adaptive " \
         "weights (set config.data.pipeline = 'memory', or give it a number)" in validate.validate(
             c, check_files=False)


@pytest.mark.slow  # two tiny training runs (~20 s each on 2 cores)
def test_training_on_auto_equals_training_on_the_stream(tmp_path):
  from jaxft import train
  from tests.test_train import final_params

  folder = _photos(tmp_path / "d", per_class=6)
  kw = {"data.image_size": 12, "train.num_steps": 3, "train.eval_every": 0}
  runs = {}
  for pipe in ("auto", "stream"):
    result = train.train_and_evaluate(_config(folder, tmp_path, **{"data.pipeline": pipe, **kw}),
                                      tmp_path / pipe)
    runs[pipe] = (result, final_params(tmp_path / pipe))
  assert list((tmp_path / "cache").glob("decoded-*.u8"))  # auto held the folder decoded
  assert runs["auto"][0]["loss"] == runs["stream"][0]["loss"]
  for k, v in runs["stream"][1].items():
    np.testing.assert_array_equal(runs["auto"][1][k], v, err_msg=k)
