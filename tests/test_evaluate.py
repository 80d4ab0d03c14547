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

import orbax.checkpoint as ocp

from jaxft import checkpoint, data, evaluate
from jaxft.models import create_model

ROOT = Path(__file__).resolve().parents[1]


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
  env = {**os.environ, "JAXFT_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}  # this checkout's jaxft
  return subprocess.run([sys.executable, "-m", "jaxft.evaluate", *args], capture_output=True, text=True,
                        timeout=300, env=env)


def test_cli_end_to_end(model, tmp_path: Path) -> None:
  folder = write_folder(tmp_path / "data")
  ck = checkpoint.save_model(tmp_path / "ck", model)
  out, png = tmp_path / "preds.npz", tmp_path / "plots" / "cm.png"
  r = run_cli("--checkpoint", str(ck), "--data", f"folder:{folder}", "--limit", "7", "--batch-size", "4",
              "--output", str(out), "--confusion", str(png), cache=tmp_path / "cache")
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert {"top1", "top5", "per_class", "n", "loss"} <= set(summary)
  assert summary["n"] == 7 and sorted(summary["per_class"]) == ["cat", "dog", "eel"]
  # The fixture model records no class names: scored by index, and the output says so.
  assert summary["labels"] == "by index" and "labels by index" in r.stderr
  assert summary["checkpoint_step"] is None and summary["weights"] == "model" and summary["ema"] is False
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: no such checkpoint:")
  assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------
# Which step and which weights: named in the output.


def fake_workdir(root: Path, model, val_top1: dict[int, float | None], ema=None) -> Path:
  """A training workdir's checkpoints, one step per ``val_top1`` entry (recorded as the step's metric),
  with the items the train loop writes (``ema``'s variables as the EMA item when given)."""
  # Orbax writes a step's metrics only for a manager with a best_fn.
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m[checkpoint.VAL_TOP1], best_mode="max",
                                         create=True, enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(root / checkpoint.CHECKPOINTS_SUBDIR, options=options,
                               item_names=checkpoint.TRAIN_ITEMS)
  try:
    for step, top1 in val_top1.items():
      items = {**checkpoint.save_args(model), checkpoint.TRAIN_ITEM: ocp.args.JsonSave({"step": step})}
      if ema is not None:
        items[checkpoint.EMA_ITEM] = ocp.args.StandardSave(ema.variables)
      mngr.save(step, args=ocp.args.Composite(**items),
                metrics=None if top1 is None else {checkpoint.VAL_TOP1: top1})
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return root


def scaled_head(model, factor: float):
  head = jax.tree.map(lambda a: np.asarray(a) * factor, model.params["head"])
  return model.replace(variables={**model.variables, "params": {**model.params, "head": head}})


def test_the_output_names_the_step_and_the_weights(model, tmp_path: Path, monkeypatch) -> None:
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "cache"))
  folder = f"folder:{write_folder(tmp_path / 'data')}"
  best = fake_workdir(tmp_path / "best", model, {4: 0.9, 8: 0.5}, ema=scaled_head(model, -1.0))
  r = evaluate.evaluate_checkpoint(best, folder)
  assert (r["checkpoint_step"], r["weights"], r["ema"]) == (4, "best", False)
  assert evaluate.describe_weights(r) == "step 4 (best)"
  step8 = evaluate.evaluate_checkpoint(best / "checkpoints" / "8", folder)
  assert (step8["checkpoint_step"], step8["weights"]) == (8, "step")
  ema = evaluate.evaluate_checkpoint(best, folder, ema=True)
  assert (ema["checkpoint_step"], ema["weights"], ema["ema"]) == (4, "best", True)
  assert ema["loss"] != pytest.approx(r["loss"])  # the EMA item (negated head) was evaluated, not the raw weights
  assert evaluate.describe_weights(ema) == "step 4 (best), EMA weights"
  latest = fake_workdir(tmp_path / "latest", model, {3: None, 6: None})
  r = evaluate.evaluate_checkpoint(latest, folder)
  assert (r["checkpoint_step"], r["weights"]) == (6, "latest")
  with pytest.raises(evaluate.EvalError, match=r"holds no EMA weights \(the run was trained with "):
    evaluate.evaluate_checkpoint(latest, folder, ema=True)
  ck = checkpoint.save_model(tmp_path / "ck", model)
  with pytest.raises(evaluate.EvalError, match=r"holds no EMA weights \(a model directory has none\)"):
    evaluate.evaluate_checkpoint(ck, folder, ema=True)


def test_non_finite_logits_are_an_error_naming_the_step(model, tmp_path: Path, monkeypatch) -> None:
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "cache"))
  folder = f"folder:{write_folder(tmp_path / 'data')}"
  broken = scaled_head(model, float("nan"))
  with pytest.raises(evaluate.EvalError, match=r"non-finite logits \(NaN or inf\) for 2 of 2 images") as e:
    evaluate.evaluate(broken, images(2), np.array([0, 1]))
  assert e.value.exit_code == evaluate.EXIT_NONFINITE == 3
  wd = fake_workdir(tmp_path / "wd", broken, {8: None})
  with pytest.raises(evaluate.EvalError, match=r"wd \(step 8 \(latest\)\): the model gives non-finite"):
    evaluate.evaluate_checkpoint(wd, folder, output=tmp_path / "p.npz", confusion=tmp_path / "cm.png")
  assert not (tmp_path / "p.npz").exists() and not (tmp_path / "cm.png").exists()


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


# ---------------------------------------------------------------------------------------------------------
# The eval transform a streamed run records: evaluate makes the images as validation made them.

RECORD = {"resize": "shorter_side_center_crop", "size": 16, "crop_pct": 0.8, "interpolation": "bilinear",
          "mean": [0.4, 0.5, 0.6], "std": [0.3, 0.2, 0.25]}


def write_oblong_folder(root: Path) -> Path:
  rs = np.random.RandomState(3)
  for name in ("cat", "dog", "eel"):
    (root / name).mkdir(parents=True)
    for i, (h, w) in enumerate(((40, 24), (24, 44))):
      Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(root / name / f"{i}.png")
  return root


def test_a_recorded_eval_transform_is_applied_and_older_checkpoints_resize(model, tmp_path: Path) -> None:
  from jaxft.data import host_transforms, stream  # pylint: disable=g-import-not-at-top
  folder = write_oblong_folder(tmp_path / "data")
  with_record = model.replace(meta={**model.meta, "eval_transform": dict(RECORD)})
  ck = checkpoint.save_model(tmp_path / "ck", with_record)
  got = evaluate.evaluate_checkpoint(ck, f"folder:{folder}", output=tmp_path / "p.npz")
  src = stream.open_folder(f"folder:{folder}", cache_dir=False)
  crops = np.stack([host_transforms.eval_transform(p, 16, 0.8) for p in src.paths])
  x = (crops / 255.0 - np.asarray(RECORD["mean"])) / np.asarray(RECORD["std"])
  want = np.asarray(model.apply(x.astype(np.float32)))
  np.testing.assert_allclose(np.load(tmp_path / "p.npz")["logits"], want, rtol=1e-4, atol=1e-4)
  assert got["n"] == 6
  # --image-size changes the crop side.
  evaluate.evaluate_checkpoint(ck, f"folder:{folder}", image_size=8, output=tmp_path / "p8.npz")
  crops8 = np.stack([host_transforms.eval_transform(p, 8, 0.8) for p in src.paths])
  x8 = (crops8 / 255.0 - np.asarray(RECORD["mean"])) / np.asarray(RECORD["std"])
  np.testing.assert_allclose(np.load(tmp_path / "p8.npz")["logits"],
                             np.asarray(model.apply(x8.astype(np.float32))), rtol=1e-4, atol=1e-4)
  # Without the record (a checkpoint written before it existed): whole images, resized, as before.
  old = checkpoint.save_model(tmp_path / "old", model)
  evaluate.evaluate_checkpoint(old, f"folder:{folder}", output=tmp_path / "o.npz")
  ds = data.load_source(f"folder:{folder}", image_size=32, cache_dir=False)
  np.testing.assert_allclose(np.load(tmp_path / "o.npz")["logits"],
                             evaluate.predict_logits(model, ds.images), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.load(tmp_path / "o.npz")["logits"], want, atol=1e-3)


@pytest.mark.parametrize("change, named", [
    ({"resize": "squash"}, "resize = 'squash'"), ({"size": 0}, "size = 0"), ({"crop_pct": 1.5}, "crop_pct"),
    ({"interpolation": "bicubic"}, "interpolation = 'bicubic'"), ({"std": [0.2, 0.0, 0.2]}, "std"),
    ({"mean": [0.5]}, "mean")])
def test_an_unusable_eval_transform_record_is_one_clear_error(model, tmp_path: Path, change, named) -> None:
  bad = model.replace(meta={**model.meta, "eval_transform": {**RECORD, **change}})
  with pytest.raises(evaluate.EvalError, match="meta\\['eval_transform'\\] cannot be applied: .*" + named):
    evaluate.eval_transform(bad)
  ck = checkpoint.save_model(tmp_path / "ck", bad)
  with pytest.raises(evaluate.EvalError, match=named) as e:
    evaluate.evaluate_checkpoint(ck, f"folder:{write_oblong_folder(tmp_path / 'd')}")
  assert e.value.exit_code == 2


def test_a_streamed_run_records_the_eval_transform_evaluate_reads(model) -> None:
  from jaxft import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxft.train import setup  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  c.data.pipeline, c.data.image_size, c.data.crop_pct = "stream", 24, 0.9
  ds = data.Dataset(images(3), np.array([0, 1, 2], np.int32), ("a", "b", "c"))
  streamed, _ = setup.fit_to_data(c, model, ds)
  assert evaluate.eval_transform(streamed) == {
      "resize": "shorter_side_center_crop", "size": 24, "crop_pct": 0.9, "interpolation": "bilinear",
      "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
  c.data.pipeline = "auto"  # the stream's transforms, whichever way the pixels are held
  assert setup.fit_to_data(c, model, ds)[0].meta["eval_transform"] == streamed.meta["eval_transform"]
  c.data.pipeline = "memory"  # whole images: nothing recorded, and an inherited record is dropped
  memory, _ = setup.fit_to_data(c, streamed, ds)
  assert "eval_transform" not in memory.meta and evaluate.eval_transform(memory) is None
