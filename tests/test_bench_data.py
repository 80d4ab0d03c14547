"""tools/bench_data.py: the synthetic folders it builds (the benchmark itself is not a test)."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _tool():
  spec = importlib.util.spec_from_file_location("bench_data", REPO / "tools" / "bench_data.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _tiny_cifar_tar(path: Path) -> Path:
  """A CIFAR-layout archive: 3 classes x 4 JPEGs of 32 px."""
  rng = np.random.default_rng(0)
  with tarfile.open(path, "w:gz") as tar:
    for c in ("cat", "airplane", "dog"):
      for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        info = tarfile.TarInfo(f"cifar10-jpeg/train/{c}/{i:04d}.jpg")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
  return path


def test_folders_are_balanced_resized_and_built_once(tmp_path, monkeypatch):
  tool = _tool()
  tar = _tiny_cifar_tar(tmp_path / "c.tar.gz")
  folder = tool.make_folder(tmp_path / "root", 15, tar)
  files = sorted((folder / "train").rglob("*.jpg"))
  assert len(files) == 15 and sorted(p.name for p in (folder / "train").iterdir()) == ["airplane", "cat", "dog"]
  assert [len(list((folder / "train" / c).iterdir())) for c in ("airplane", "cat", "dog")] == [5, 5, 5]
  sizes = [Image.open(f).size for f in files]
  assert all(tool.MIN_SIDE <= s <= tool.MAX_SIDE for wh in sizes for s in wh) and len(set(sizes)) > 5
  monkeypatch.setattr(tool, "_cifar_images", lambda *_: (_ for _ in ()).throw(AssertionError("rebuilt")))
  assert tool.make_folder(tmp_path / "root", 15, tar) == folder  # cached: not rebuilt
  assert not list((tmp_path / "root").glob(".n15.*"))  # no partial folder left behind
