"""Evaluation: library function (preprocessing, padding, one compile) and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxft import checkpoint, data, evaluate
from jaxft.models import create_model


@pytest.fixture(scope="module")
def model():
  m = create_model("cifar_resnet20", jax.random.key(0), num_classes=3)
  # Deterministic non-trivial head so that predictions differ between images.
  head = jax.tree.map(lambda a: a + 0.1 * np.asarray(jax.random.normal(jax.random.key(1), a.shape)),
                      m.params["head"])
  return m.replace(variables={**m.variables, "params": {**m.params, "head": head}},
                   meta={**m.meta, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_logits_match_a_plain_forward_and_padding_compiles_once(model, monkeypatch) -> None:
  x = images(5)
  traces = []
  real = data.preprocess_eval
  monkeypatch.setattr(data, "preprocess_eval", lambda *a, **k: traces.append(1) or real(*a, **k))
  got = evaluate.predict_logits(model, x, batch_size=2)
  assert len(traces) == 1  # batches of 2, 2 and a padded 1: one trace
  norm = (x / 255.0 - np.asarray([0.5, 0.4, 0.3])) / np.asarray([0.2, 0.25, 0.3])
  want = np.asarray(model.apply(norm.astype(np.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resizes_to_the_meta_input_size(model) -> None:
  x = images(2, size=16)
  got = evaluate.predict_logits(model, x)
  want = model.apply(data.preprocess_eval(x, model.meta["mean"], model.meta["std"], out_size=32))
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
  # An explicit size overrides the meta (16 px keeps the images as they are).
  own = evaluate.predict_logits(model, x, image_size=16)
  want16 = model.apply(data.preprocess_eval(x, model.meta["mean"], model.meta["std"]))
  np.testing.assert_allclose(own, np.asarray(want16), rtol=1e-5, atol=1e-5)


def test_metrics(model) -> None:
  x = images(6, seed=3)
  logits = evaluate.predict_logits(model, x)
  pred = logits.argmax(-1)
  labels = np.array([pred[0], pred[1], (pred[2] + 1) % 3, pred[3], (pred[4] + 1) % 3, pred[5]])
  r = evaluate.evaluate(model, x, labels, batch_size=4, class_names=["a", "b", "c"])
  assert r["n"] == 6 and r["top1"] == pytest.approx(4 / 6) and r["top5"] == 1.0
  np.testing.assert_allclose(r["logits"], logits, rtol=1e-6)
  for i, name in enumerate("abc"):
    mask = labels == i
    want = float((pred[mask] == i).mean()) if mask.any() else None
    got = r["per_class"][name]
    assert (np.isnan(got) if want is None else got == pytest.approx(want)), name


def test_bad_inputs(model) -> None:
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for a 3-class model, got \[0, 3\]"):
    evaluate.evaluate(model, images(2), np.array([0, 3]))
  with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\], got shape \[2, 32, 32\]"):
    evaluate.predict_logits(model, images(2)[..., 0])
  with pytest.raises(ValueError, match=r"labels must have shape \[2\], got \[3\]"):
    evaluate.evaluate(model, images(2), np.array([0, 1, 2]))


def write_folder(root: Path, per_class: int = 3) -> Path:
  rs = np.random.RandomState(7)
  for c, name in enumerate(["cat", "dog", "eel"]):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      im = Image.fromarray(rs.randint(0, 256, (32, 32, 3)).astype(np.uint8))
      im.save(root / name / (f"{i}.png" if i % 2 else f"{i}.jpg"))
  return root


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAXFT_CACHE_DIR": str(cache)}
  return subprocess.run([sys.executable, "-m", "jaxft.evaluate", *args], capture_output=True, text=True,
                        timeout=300, env=env)


def test_cli_end_to_end(model, tmp_path: Path) -> None:
  folder = write_folder(tmp_path / "data")
  ck = checkpoint.save_model(tmp_path / "ck", model)
  out = tmp_path / "preds.npz"
  r = run_cli("--checkpoint", str(ck), "--data", f"folder:{folder}", "--limit", "7", "--batch-size", "4",
              "--output", str(out), cache=tmp_path / "cache")
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert {"top1", "top5", "per_class", "n"} <= set(summary)
  assert summary["n"] == 7 and sorted(summary["per_class"]) == ["cat", "dog", "eel"]
  saved = np.load(out)
  assert saved["logits"].shape == (7, 3) and saved["labels"].shape == (7,)
  assert list(saved["class_names"]) == ["cat", "dog", "eel"]
  assert np.bincount(saved["labels"]).tolist() == [3, 2, 2]  # --limit spreads over the classes
  # Same numbers as the library on the same images.
  ds = data.load_source(f"folder:{folder}", limit=7, cache_dir=False)
  want = evaluate.evaluate(model, ds.images, ds.labels, class_names=ds.class_names)
  np.testing.assert_allclose(saved["logits"], want["logits"], rtol=1e-5, atol=1e-5)
  assert summary["top1"] == pytest.approx(want["top1"])


def test_cli_errors(tmp_path: Path) -> None:
  r = run_cli("--checkpoint", str(tmp_path / "missing"), "--data", "folder:x", cache=tmp_path)
  assert r.returncode == 1 and "error: no such checkpoint:" in r.stderr


@pytest.mark.slow
def test_cli_on_real_weights(resnet56_th: Path, cifar_folder: Path, tmp_path: Path) -> None:
  from jaxft.convert import convert_file
  ck = checkpoint.save_model(tmp_path / "r56", convert_file(resnet56_th, "cifar_resnet56"))
  r = run_cli("--checkpoint", str(ck), "--data", f"folder:{cifar_folder}", cache=tmp_path / "cache")
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  print(f"\njaxft.evaluate resnet56 on {summary['n']} CIFAR-10 train JPEGs: top-1 {summary['top1']:.4f} "
        f"top-5 {summary['top5']:.4f}")
  assert summary["n"] == 1000 and len(summary["per_class"]) == 10
  assert summary["top1"] > 0.85
