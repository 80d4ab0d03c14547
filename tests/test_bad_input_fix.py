"""Bad input of the optimizer rules: a rule that matches no parameter is one clear error, never a rule
silently ignored (unless ``optim.allow_unmatched_rules``), and nothing on disk is lost or changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxft import train
from test_train import tiny_config, write_folder

ROOT = Path(__file__).resolve().parents[1]

# rule set → (config overrides, the rule that matches nothing, a path the message offers instead)
CASES = {
    "lr_rules": ({"optim.lr_rules": (("layr1/.*", "frozen"),)}, "layr1/.*", "(nearest: layer1,"),
    "wd_rules": ({"optim.weight_decay": 0.1, "optim.wd_rules": (("(.*/)?kernal", True),)},
                 "(.*/)?kernal", "/kernel"),
    "l2sp.rules": ({"optim.l2sp.alpha": 0.1, "optim.l2sp.rules": (("stem/conv/kernal", True),)},
                   "stem/conv/kernal", "stem/conv/kernel"),
    "l2sp.new_rules": ({"optim.l2sp.alpha": 0.1, "optim.l2sp.new_rules": (("haed/.*", True),)},
                       "haed/.*", "head/"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return write_folder(tmp_path_factory.mktemp("data") / "tiny", per_class=4)


def _snapshot(*roots: Path) -> dict[str, str]:
  """Every file under ``roots`` → sha256 of its bytes."""
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
          for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _workdir(tmp_path: Path) -> Path:
  """A workdir holding a file of the user's, which a refused run must leave alone."""
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine\n")
  return wd


@pytest.mark.parametrize("what", sorted(CASES))
def test_unmatched_rule_is_one_clear_error(what, folder, tmp_path):
  overrides, rule, nearest = CASES[what]
  wd = _workdir(tmp_path)
  before = _snapshot(folder, wd)
  with pytest.raises(train.TrainError) as e:
    train.train_and_evaluate(tiny_config(folder, tmp_path, **overrides), wd)
  msg = str(e.value)
  assert getattr(e.value, "exit_code", 2) == 2
  assert "\n" not in msg
  assert f"{what} rule {rule!r} matches no parameter" in msg and nearest in msg
  assert "allow_unmatched_rules" in msg  # the way out
  after = _snapshot(folder, wd)
  assert {k: v for k, v in after.items() if k in before} == before  # nothing lost or changed
  assert not (wd / "checkpoints").exists()


def test_unmatched_rule_allowed_explicitly(folder, tmp_path):
  overrides, _, _ = CASES["lr_rules"]
  cfg = tiny_config(folder, tmp_path, **overrides, **{"optim.allow_unmatched_rules": True,
                                                       "train.num_steps": 1, "train.eval_every": 0})
  assert train.train_and_evaluate(cfg, tmp_path / "run")["step"] == 1


def test_cli_unmatched_rule_exits_2_with_one_line(folder, tmp_path):
  wd = _workdir(tmp_path)
  before = _snapshot(folder, wd)
  cmd = [sys.executable, "-m", "jaxft.train", "--config", str(ROOT / "configs" / "tiny.py"),
         f"--config.data.source=folder:{folder}", f"--config.data.cache_dir={tmp_path / 'cache'}",
         "--config.optim.lr_rules=(('layr1/.*', 'frozen'),)", "--workdir", str(wd)]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's jaxft, also where another is installed
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "lr_rules rule 'layr1/.*' matches no parameter" in last
  after = _snapshot(folder, wd)
  assert {k: v for k, v in after.items() if k in before} == before



# config key → (overrides, what the message must say): ops the config asks for that refuse
OP_CASES = {
    "bn_momentum": ({"model.bn_momentum": 1.5}, ("bn_momentum", "1.5")),
    "dropout": ({"model.dropout": 1.5}, ("dropout", "1.5")),
    "surgery selector": ({"surgery": [{"op": "add_adapters", "blocks": "layr3/.*", "width": 4}]},
                         ("config.surgery", "'layr3/.*' matched 0", "layer3/block0")),
    "surgery op": ({"surgery": [{"op": "add_adaptors", "width": 4}]},
                   ("config.surgery", "unknown op 'add_adaptors'", "add_adapters")),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_refused_config_op_is_one_clear_error(case, folder, tmp_path):
  overrides, says = OP_CASES[case]
  wd = _workdir(tmp_path)
  before = _snapshot(folder, wd)
  with pytest.raises(train.TrainError) as e:
    train.train_and_evaluate(tiny_config(folder, tmp_path, **overrides), wd)
  msg = str(e.value)
  assert getattr(e.value, "exit_code", 2) == 2 and "\n" not in msg
  assert all(s in msg for s in says), msg
  after = _snapshot(folder, wd)
  assert {k: v for k, v in after.items() if k in before} == before
  assert not (wd / "checkpoints").exists()
