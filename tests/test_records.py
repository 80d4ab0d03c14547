"""Random-access record sources for the stream (jaxft.data.records): ArrayRecord files of encoded
images, and TFDS through tfds.data_source (its mock data: offline, no TensorFlow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft.data import DataError, records, sources, stream

pytest.importorskip("array_record")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "cache"))


def _folder(root: Path) -> Path:
  rng = np.random.default_rng(0)
  for c in ("ant", "bee"):
    (root / c).mkdir(parents=True)
    for i in range(4):
      px = rng.integers(0, 256, (30 + 7 * i, 40 - 3 * i, 3), dtype=np.uint8)
      Image.fromarray(px).save(root / c / f"{i}.{'jpg' if i % 2 else 'png'}")
  return root


def _records(tmp_path: Path) -> tuple[stream.FileSource, Path]:
  files = stream.open_folder(f"folder:{_folder(tmp_path / 'img')}")
  out = tmp_path / "rec"
  records.write_arrayrecord(out, "train", files.paths, files.labels, files.class_names)
  return files, out


def _batches(source, steps=3):
  ds = stream.train_dataset(source, stream.StreamOptions(size=16), batch_size=4, seed=2,
                            process_index=0, process_count=1)
  with stream.StreamIterator(ds, 0, steps) as it:
    return list(it)


def test_arrayrecord_streams_the_folders_batches_bit_for_bit(tmp_path):
  files, out = _records(tmp_path)
  rec = stream.open_source(f"arrayrecord:{out}")
  assert isinstance(rec, records.RecordSource) and len(rec) == 8 and rec.class_names == ("ant", "bee")
  np.testing.assert_array_equal(rec.labels, files.labels)
  for (sa, ia, la), (sb, ib, lb) in zip(_batches(files), _batches(rec)):
    assert sa == sb
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(la, lb)
  opts = stream.StreamOptions(size=16, train=False)
  np.testing.assert_array_equal(stream.eval_arrays(rec.subset([5, 2]), opts).images,
                                stream.eval_arrays(files.subset([5, 2]), opts).images)
  assert len(stream.open_source(f"arrayrecord:{out}", limit=3)) == 3


def test_a_record_source_pickles_as_its_path_and_reopens(tmp_path):
  import cloudpickle  # how grain sends the pipeline to its workers

  _, out = _records(tmp_path)
  rec = stream.open_source(f"arrayrecord:{out}")
  first = rec.item(3)  # opens the reader
  blob = cloudpickle.dumps(rec)
  assert len(blob) < 3000 and cloudpickle.loads(blob).item(3) == first
  assert rec.fingerprint() == stream.open_source(f"arrayrecord:{out}").fingerprint()


def test_bad_arrayrecord_directories_are_one_line_errors(tmp_path):
  files, out = _records(tmp_path)
  with pytest.raises(DataError, match=r"'arrayrecord:.*nowhere': '.*train.array_record' not found; an "
                     "arrayrecord: directory holds"):
    stream.open_source(f"arrayrecord:{tmp_path / 'nowhere'}")
  meta = out / "train.json"
  good = meta.read_text()
  meta.write_text(json.dumps({"class_names": ["ant", "bee"], "labels": [0, 1]}))
  with pytest.raises(DataError, match="holds 8 records but .* 2 labels; rewrite them together"):
    stream.open_source(f"arrayrecord:{out}")
  meta.write_text(json.dumps({"class_names": ["ant"], "labels": [0, 1] * 4}))
  with pytest.raises(DataError, match="every label must be an index into its 1 class_names"):
    stream.open_source(f"arrayrecord:{out}")
  meta.write_text("{not json")
  with pytest.raises(DataError, match=r"is not a label file \(JSONDecodeError"):
    stream.open_source(f"arrayrecord:{out}")
  meta.write_text(good)
  with pytest.raises(DataError, match="read by the streaming pipeline only; set data.pipeline='stream'"):
    sources.load_source(f"arrayrecord:{out}")
  with pytest.raises(DataError, match="one label in \\[0, 2\\) per file; got 1 labels for 8 files"):
    records.write_arrayrecord(tmp_path / "x", "train", files.paths, [0], files.class_names)


def test_a_record_that_does_not_decode_names_its_example(tmp_path):
  out = tmp_path / "rec"
  good = _folder(tmp_path / "img") / "ant" / "0.png"
  (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not really")
  records.write_arrayrecord(out, "train", [good, good, tmp_path / "garbage.jpg", good], [0, 1, 1, 0],
                            ("ant", "bee"))
  with pytest.raises(DataError, match=r"cannot decode example 2 \("):
    _batches(stream.open_source(f"arrayrecord:{out}"), steps=2)


def test_opening_records_does_not_import_tensorflow(tmp_path):
  _, out = _records(tmp_path)
  code = (f"import sys; from jaxft.data import stream; s = stream.open_source('arrayrecord:{out}'); "
          "s.item(0); print('tensorflow' in sys.modules, len(s))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert r.stdout.split() == ["False", "8"]


def test_tfds_streams_through_data_source_without_tensorflow():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    src = stream.open_source("tfds:mnist", "train")
    assert isinstance(src, records.TfdsSource) and len(src) == 6 and src.class_names[:2] == ("0", "1")
    image, label = src.item(4)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and label == src.labels[4]
    batch = stream.eval_arrays(src, stream.StreamOptions(size=16, train=False))
    assert batch.images.shape == (6, 16, 16, 3)
    if "tensorflow" not in sys.modules:  # the in-memory pipeline's tfds.load needs TensorFlow
      with pytest.raises(DataError, match=r"in memory needs tensorflow \(tfds.load\); pip install "
                         r"jaxft\[tfds-tf\], or stream it"):
        sources.load_source("tfds:mnist")
  assert "tensorflow" not in sys.modules
  with pytest.raises(DataError, match=r"tfds.data_source cannot open 'tfds:no_such_dataset_xyz'"):
    stream.open_source("tfds:no_such_dataset_xyz", "train")
