"""Bad input to ``loss.delta`` / ``loss.bss``: each is one clear line naming the problem and the fix, before
any step runs (and, through the CLI, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxft import checkpoint, models, train, validate
from jaxft.train import errors
from test_train import tiny_config, write_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return write_folder(tmp_path_factory.mktemp("data") / "tiny", per_class=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
  path = tmp_path_factory.mktemp("weights") / "resnet8"
  checkpoint.save_model(path, models.create_model("cifar_resnet8", jax.random.key(7), num_classes=2))
  return path


def test_delta_without_pretrained_weights_is_one_line(folder, tmp_path):
  cfg = tiny_config(folder, tmp_path, **{"loss.delta": 0.5})
  want = ("config.loss.delta = 0.5: needs pretrained weights to stay close to (set "
          "config.model.pretrained, or loss.delta = 0)")
  assert validate.validate(cfg) == [want]
  with pytest.raises(train.TrainError) as e:
    train.train_and_evaluate(cfg, tmp_path / "run")
  assert str(e.value) == want and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("stages, message", [
    (("layer1", "layer1"), "config.loss.delta_stages = ('layer1', 'layer1'): must not name anything twice"),
    (("layer1", ""), "config.loss.delta_stages = ('layer1', ''): must be a tuple of names (non-empty "
                     "strings)"),
])
def test_delta_stages_of_the_wrong_form(stages, message, folder, tmp_path, pretrained):
  cfg = tiny_config(folder, tmp_path, **{"loss.delta": 0.5, "loss.delta_stages": stages,
                                         "model.pretrained": str(pretrained)})
  assert validate.validate(cfg) == [message]


def test_unknown_delta_stage_is_one_line_through_the_cli(folder, tmp_path, pretrained):
  wd = tmp_path / "run"
  r = subprocess.run(
      [sys.executable, "-m", "jaxft.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
       f"--config.data.source=folder:{folder}", f"--config.data.cache_dir={tmp_path / 'c'}",
       f"--config.model.pretrained={pretrained}", "--config.loss.delta=0.5",
       "--config.loss.delta_stages=('layer1','layer9')", f"--workdir={wd}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
  assert r.returncode == errors.EXIT_BAD_INPUT, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert lines == ["error: loss.delta_stages: unknown stage 'layer9'; the stages both the pretrained and "
                   "the trained model have: layer1, layer2, layer3"], r.stderr[-3000:]
  assert not (wd / "checkpoints").exists()


def test_stage_removed_by_surgery_is_one_clear_error(folder, tmp_path, pretrained):
  cfg = tiny_config(folder, tmp_path, **{
      "loss.delta": 0.5, "loss.delta_stages": ("layer3",), "model.pretrained": str(pretrained),
      "surgery": [{"op": "remove_stage", "stage": "layer3"}]})
  with pytest.raises(train.TrainError, match=r"^loss.delta_stages: stage 'layer3' was removed by surgery; "
                                             r"DELTA needs stages both models share: layer1, layer2$"):
    train.train_and_evaluate(cfg, tmp_path / "run")


def test_bss_k_above_the_singular_values_of_a_batch(folder, tmp_path):
  cfg = tiny_config(folder, tmp_path, **{"loss.bss": 0.1, "loss.bss_k": 5})  # batch_size 4
  with pytest.raises(train.TrainError, match=r"^loss.bss_k = 5 but a batch's pooled features have only 4 "
                                             r"singular values .*lower loss.bss_k$"):
    train.train_and_evaluate(cfg, tmp_path / "run")
  assert "config.loss.bss_k = 0: must be an integer >= 1" in validate.validate(
      tiny_config(folder, tmp_path, **{"loss.bss_k": 0}))
