"""Evaluation that cannot be silently wrong: classes matched by name (a subset or reordered folder scores
what the full folder does), and every bad input to ``python -m jaxft.evaluate`` one ``error:`` line with
its exit code, no traceback, and nothing on disk changed or written (except a PNG asked for)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxft import checkpoint, evaluate
from jaxft.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ---------------------------------------------------------------------------------------------------------
# Subset and reordered folders: the real CIFAR ResNet-20 on real CIFAR-10 JPEGs.


@pytest.fixture(scope="module")
def resnet20(shared_dir: Path):
  from jaxft.convert import convert_file
  paths = sorted((shared_dir / "weights" / "cifar-resnet").glob("resnet20-*.th"))
  if not paths:
    pytest.skip("resnet20 checkpoint missing from ../shared")
  m = convert_file(paths[0], "cifar_resnet20")
  assert "class_names" not in m.meta  # converted weights record no classes: set the true ones
  return m.replace(meta={**m.meta, "class_names": list(CIFAR10)})


def reversed_classes(model):
  """The same network with its outputs (head columns and class names) in reverse order."""
  head = {k: np.asarray(v)[..., ::-1] for k, v in model.params["head"].items()}
  return model.replace(variables={**model.variables, "params": {**model.params, "head": head}},
                       meta={**model.meta, "class_names": model.meta["class_names"][::-1]})


def copy_classes(src: Path, dest: Path, names: tuple[str, ...]) -> Path:
  for name in names:
    shutil.copytree(src / name, dest / name)
  return dest


def test_subset_and_reordered_folders_score_by_class_name(resnet20, cifar_folder: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path / "cache"))
  ck = checkpoint.save_model(tmp_path / "r20", resnet20)
  full = evaluate.evaluate_checkpoint(ck, f"folder:{cifar_folder}")
  assert full["labels"] == "by name" and full["n"] == 1000 and full["top1"] > 0.8
  assert list(full["per_class"]) == list(CIFAR10)
  # Only cat and dog: labels 0 and 1 of the folder are outputs 3 and 5 of the checkpoint.
  pets = f"folder:{copy_classes(cifar_folder, tmp_path / 'pets', ('cat', 'dog'))}"
  sub = evaluate.evaluate_checkpoint(ck, pets)
  assert sub["n"] == 200 and list(sub["per_class"]) == ["cat", "dog"]
  for name in ("cat", "dog"):
    assert sub["per_class"][name] == full["per_class"][name]
  assert sub["top1"] == pytest.approx((full["per_class"]["cat"] + full["per_class"]["dog"]) / 2)
  # What this test guards against: scored by index, the same folder is the near-zero accuracy.
  unnamed = checkpoint.save_model(tmp_path / "r20-unnamed", resnet20.replace(
      meta={k: v for k, v in resnet20.meta.items() if k != "class_names"}))
  by_index = evaluate.evaluate_checkpoint(unnamed, pets)
  assert by_index["labels"] == "by index" and by_index["top1"] < 0.1
  print(f"\nresnet20, 1000 CIFAR-10 JPEGs: top-1 {full['top1']:.4f}; cat+dog folder by name "
        f"{sub['top1']:.4f}, by index {by_index['top1']:.4f}")
  # The checkpoint's order is not the folder's (sorted) order: the same accuracies.
  rev = checkpoint.save_model(tmp_path / "r20-reversed", reversed_classes(resnet20))
  again = evaluate.evaluate_checkpoint(rev, f"folder:{cifar_folder}")
  assert again["per_class"] == full["per_class"]
  assert (again["top1"], again["top5"]) == (full["top1"], full["top5"])
  assert again["loss"] == pytest.approx(full["loss"], rel=1e-6)


def test_label_table() -> None:
  np.testing.assert_array_equal(evaluate.label_table(["dog", "cat"], ["cat", "eel", "dog"], 3), [2, 0])
  np.testing.assert_array_equal(evaluate.label_table(["x", "y"], None, 3), [0, 1])
  with pytest.raises(evaluate.EvalError, match=r"class folder\(s\) \['zebra'\] are not classes of the "
                     r"checkpoint, which knows \['cat', 'eel', 'dog'\]; rename or remove"):
    evaluate.label_table(["cat", "zebra"], ["cat", "eel", "dog"], 3)
  many = [f"c{i}" for i in range(30)]
  with pytest.raises(evaluate.EvalError, match=r"knows \['c0', .*'c19', … \(30 in all\)\]"):
    evaluate.label_table(["zebra"], many, 30)
  with pytest.raises(evaluate.EvalError, match=r"the data has 4 classes but the checkpoint's head has 3 "
                     r"outputs and records no class names"):
    evaluate.label_table(list("abcd"), None, 3)


# ---------------------------------------------------------------------------------------------------------
# The CLI on bad input.


def _model(class_names=None):
  m = create_model("cifar_resnet20", jax.random.key(0), num_classes=3)
  return m if class_names is None else m.replace(meta={**m.meta, "class_names": class_names})


def _images(folder: Path, names: tuple[str, ...], per_class: int = 2) -> Path:
  rs = np.random.RandomState(0)
  for name in names:
    (folder / name).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rs.randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(folder / name / f"{i}.png")
  return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """Checkpoints and data folders the cases point at (read-only for them)."""
  w = tmp_path_factory.mktemp("world")
  checkpoint.save_model(w / "ck", _model())
  checkpoint.save_model(w / "named", _model(["cat", "dog", "eel"]))
  checkpoint.save_model(w / "badnames", _model(["cat", "dog"]))
  nan = _model()
  head = jax.tree.map(lambda a: np.full(a.shape, np.nan, np.float32), nan.params["head"])
  checkpoint.save_model(w / "nan", nan.replace(variables={**nan.variables,
                                                          "params": {**nan.params, "head": head}}))
  for kind in ("truncated", "deleted", "no-record"):
    shutil.copytree(w / "ck", w / kind)
  largest = max((w / "truncated" / "variables").rglob("*"), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)
  (w / "deleted" / largest.relative_to(w / "truncated")).unlink()
  (w / "no-record" / checkpoint.MODEL_ITEM / "metadata").unlink()
  _images(w / "data", ("cat", "dog", "eel"))
  _images(w / "zoo", ("cat", "zebra"))
  _images(w / "four", ("a", "b", "c", "d"))
  (w / "empty").mkdir()
  (w / "file.txt").write_text("not a checkpoint\n")
  return w


def snapshot(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(root.rglob("*"))}


def run_cli(args: list[str], world: Path, cwd: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXFT_CACHE_DIR": str(cwd.parent / "cache")}
  return subprocess.run([sys.executable, "-m", "jaxft.evaluate", *args], capture_output=True, text=True,
                        timeout=300, env=env, cwd=cwd)


OK = ["--checkpoint", "{w}/ck", "--data", "folder:{w}/data"]
CASES = {  # id: (arguments, exit code, what the one error line says)
    "missing-checkpoint": (["--checkpoint", "{w}/nope", "--data", "folder:{w}/data"], 2,
                           r"no such checkpoint: .*/nope$"),
    "checkpoint-is-a-data-folder": (["--checkpoint", "{w}/data", "--data", "folder:{w}/data"], 2,
                                    r"/data is not a jaxft checkpoint: expected the items"),
    "checkpoint-is-a-file": (["--checkpoint", "{w}/file.txt", "--data", "folder:{w}/data"], 2,
                             r"file.txt is not a jaxft checkpoint"),
    "unknown-scheme": (["--checkpoint", "{w}/ck", "--data", "imgs:{w}/data"], 2,
                       r"unknown data source 'imgs:.*'; valid sources are folder:PATH"),
    "no-scheme": (["--checkpoint", "{w}/ck", "--data", "{w}/data"], 2, r"unknown data source"),
    "missing-data": (["--checkpoint", "{w}/ck", "--data", "folder:{w}/nope"], 2,
                     r"data path '.*/nope' .* does not exist"),
    "empty-folder": (["--checkpoint", "{w}/ck", "--data", "folder:{w}/empty"], 2,
                     r"has no class sub-folders"),
    "unknown-class": (["--checkpoint", "{w}/named", "--data", "folder:{w}/zoo"], 2,
                      r"class folder\(s\) \['zebra'\] are not classes of the checkpoint, which knows "
                      r"\['cat', 'dog', 'eel'\]"),
    "more-classes-than-outputs": (["--checkpoint", "{w}/ck", "--data", "folder:{w}/four"], 2,
                                  r"the data has 4 classes but the checkpoint's head has 3 outputs"),
    "bad-meta-class-names": (["--checkpoint", "{w}/badnames", "--data", "folder:{w}/data"], 2,
                             r"meta\['class_names'\] must be 3 distinct names, one per output"),
    "ema-on-a-model-dir": ([*OK, "--ema"], 2, r"holds no EMA weights \(a model directory has none\)"),
    "limit-zero": ([*OK, "--limit", "0"], 2, r"--limit must be a positive number, got 0"),
    "limit-negative": ([*OK, "--limit", "-3"], 2, r"--limit must be a positive number, got -3"),
    "limit-not-a-number": ([*OK, "--limit", "ten"], 2, r"argument --limit: invalid int value: 'ten'"),
    "batch-size-zero": ([*OK, "--batch-size", "0"], 2, r"--batch-size must be a positive number"),
    "image-size-negative": ([*OK, "--image-size", "-1"], 2, r"--image-size must be a positive number"),
    "confusion-not-png": ([*OK, "--confusion", "cm.jpg"], 2, r"--confusion writes a PNG image: give a "
                          r"path ending in .png, got 'cm.jpg'"),
    "missing-data-flag": (["--checkpoint", "{w}/ck"], 2, r"the following arguments are required: --data"),
    "unknown-flag": ([*OK, "--frobnicate"], 2, r"unrecognized arguments: --frobnicate"),
    # A damaged checkpoint: the step is named, not a traceback (the files are compressed chunks, so
    # flipped bytes fail to decode the same way).
    "damaged-truncated": (["--checkpoint", "{w}/truncated", "--data", "folder:{w}/data"], 4,
                          r"/truncated.* damaged"),
    "damaged-deleted-file": (["--checkpoint", "{w}/deleted", "--data", "folder:{w}/data"], 4,
                             r"/deleted.* damaged"),
    "damaged-no-model-record": (["--checkpoint", "{w}/no-record", "--data", "folder:{w}/data"], 4,
                                r"/no-record.* damaged"),
    "nan-weights": (["--checkpoint", "{w}/nan", "--data", "folder:{w}/data", "--output", "p.npz",
                     "--confusion", "cm.png"], 3,
                    r"/nan \(model weights\): the model gives non-finite logits \(NaN or inf\) for 6 of 6 "
                    r"images"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input_is_one_line(case: str, world: Path, tmp_path: Path) -> None:
  args, code, message = CASES[case]
  before = snapshot(world)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  r = run_cli([a.format(w=world) for a in args], world, cwd)
  assert r.returncode == code, r.stderr
  assert "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and errors[0] == lines[-1], r.stderr
  assert re.search(message, errors[0]), errors[0]
  assert r.stdout == ""  # no summary line for a failed evaluation
  assert snapshot(world) == before and not any(cwd.iterdir())


def test_debug_shows_the_traceback_and_keeps_the_exit_code(world: Path, tmp_path: Path) -> None:
  # Proof that the traceback assertion above can fail.
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  r = run_cli(["--checkpoint", f"{world}/nope", "--data", f"folder:{world}/data", "--debug"], world, cwd)
  assert r.returncode == 2 and "Traceback" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: no such checkpoint:")


def test_only_the_asked_png_is_written(world: Path, tmp_path: Path) -> None:
  before = snapshot(world)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  r = run_cli([*(a.format(w=world) for a in OK), "--confusion", "cm.png"], world, cwd)
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in cwd.iterdir()) == ["cm.png"] and snapshot(world) == before
