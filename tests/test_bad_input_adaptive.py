"""Bad adaptive(min, max, target_gap) input: one clear line each, before anything loads (the CLI cases
through the real ``python -m jaxft.train``, sharing runs; the rest in process)."""

from __future__ import annotations

import re

import ml_collections
import pytest

import jaxft
from jaxft import config as config_lib
from jaxft import validate
from jaxft.train import errors
from test_bad_input_config import TINY, _config_file, _errors, _run, _tree, _workdir

# --config.KEY=VALUE → the line naming the key, the value and what is wrong.
BAD_SPECS = {
    "optim.weight_decay=adaptive(1e-2,1e-4,0.05)":
        "config.optim.weight_decay = 'adaptive(1e-2,1e-4,0.05)': adaptive min = 0.01 is above max = "
        "0.0001: swap them",
    "optim.l2sp.alpha=adaptive(-1e-4,1e-1,0.05)":
        "config.optim.l2sp.alpha = 'adaptive(-1e-4,1e-1,0.05)': adaptive min = -0.0001: must be > 0 (a "
        "multiplicative rule cannot move a weight off 0)",
    "loss.kd=adaptive(0.1,1,0)":
        "config.loss.kd = 'adaptive(0.1,1,0)': adaptive target_gap = 0.0: must be > 0 (the val - train "
        "loss gap to hold)",
    "loss.feature=adaptive(0.1,1)":
        "config.loss.feature = 'adaptive(0.1,1)': 'adaptive(0.1,1)' is not adaptive(min, max, "
        "target_gap), e.g. adaptive(1e-4, 1e-1, 0.05)",
    "model.dropout=adaptive(0.1,1.5,0.05)":
        "config.model.dropout = 'adaptive(0.1,1.5,0.05)': adaptive max = 1.5: must be in [0, 1)",
    "loss.ce=adaptive(0,1,0.05)":
        "config.loss.ce = 'adaptive(0,1,0.05)': adaptive min = 0.0: must be > 0 (a multiplicative rule "
        "cannot move a weight off 0)",
}


@pytest.fixture(scope="module")
def bad_specs_run(tmp_path_factory: pytest.TempPathFactory):
  tmp = tmp_path_factory.mktemp("bad_specs")
  wd = _workdir(tmp)
  args = ["--config", TINY, "--workdir", str(wd), "--config.data.source=sklearn:digits"]
  return _run(args + [f"--config.{kv}" for kv in BAD_SPECS], tmp), wd


@pytest.mark.parametrize("override", list(BAD_SPECS))
def test_bad_adaptive_spec_is_one_line(bad_specs_run, override):
  r, wd = bad_specs_run
  assert r.returncode == errors.EXIT_BAD_INPUT
  lines = _errors(r)
  assert len(lines) == len(BAD_SPECS)
  assert f"error: {BAD_SPECS[override]}" in lines
  assert _tree(wd) == {"notes.txt": b"mine"}


def test_adaptive_on_a_field_that_cannot_take_it_is_one_line(tmp_path):
  wd = _workdir(tmp_path)
  r = _run(["--config", TINY, "--workdir", str(wd), "--config.optim.lr=adaptive(1e-4,1e-1,0.05)"], tmp_path)
  assert r.returncode == errors.EXIT_BAD_INPUT
  assert _errors(r) == ["error: --config.optim.lr cannot be adaptive(...); fields that can: "
                        "optim.l2sp.alpha, optim.weight_decay, model.dropout, loss.<term> (every loss "
                        "weight)"]
  body = ("import jaxft\nfrom configs import tiny\ndef get_config():\n  c = tiny.get_config()\n"
          "  c.train.label_smoothing = jaxft.adaptive(0.01, 0.1, 0.05)\n  return c\n")
  path = _config_file(tmp_path, "lr.py", body)
  r = _run(["--config", str(path), "--workdir", str(wd)], tmp_path)
  assert r.returncode == errors.EXIT_BAD_INPUT
  lines = _errors(r)
  assert len(lines) == 1 and re.search(r"lr\.py, line 5 \(.*\): field 'label_smoothing' cannot be "
                                       r"adaptive\(\.\.\.\); fields that can: optim\.l2sp\.alpha", lines[0])
  assert _tree(wd) == {"notes.txt": b"mine"}


def test_validate_names_an_unsupported_adaptive_field():
  # A config that escaped ml_collections' type lock (built without type safety) is still refused.
  c = ml_collections.ConfigDict(config_lib.default_config().to_dict(), type_safe=False)
  c.data.source, c.model.arch = "sklearn:digits", "cifar_resnet8"
  c.optim.lr = "adaptive(1e-4, 1e-1, 0.05)"
  assert validate.validate(c) == [
      "config.optim.lr = 'adaptive(1e-4, 1e-1, 0.05)': this field cannot be adaptive; fields that can: "
      "optim.l2sp.alpha, optim.weight_decay, model.dropout, loss.<term> (every loss weight)"]


def test_adaptive_needs_a_validation_set_and_evaluations():
  c = config_lib.default_config()
  c.data.source, c.model.arch = "sklearn:digits", "cifar_resnet8"
  c.optim.weight_decay = jaxft.adaptive(1e-4, 1e-2, 0.05)
  assert validate.validate(c) == []
  c.data.val_fraction = 0.0
  c.train.eval_every = 0
  assert validate.validate(c) == [
      "config.optim.weight_decay is adaptive: it needs a validation set (set config.data.val_fraction "
      "> 0 or config.data.val_source), or give it a number",
      "config.optim.weight_decay is adaptive: it moves at each evaluation, so config.train.eval_every "
      "must be > 0"]


@pytest.mark.parametrize("args,message", [
    ((0.1, 0.01, 0.05), r"adaptive min = 0.1 is above max = 0.01: swap them"),
    ((-1.0, 1.0, 0.05), r"adaptive min = -1.0: must be > 0"),
    ((1e-3, 1.0, 0.0), r"adaptive target_gap = 0.0: must be > 0"),
    ((1e-3, float("nan"), 0.1), r"must be finite numbers"),
    ((1e-3, "1", 0.1), r"must be finite numbers"),
])
def test_adaptive_function_refuses_bad_bounds(args, message):
  with pytest.raises(ValueError, match=message):
    jaxft.adaptive(*args)
