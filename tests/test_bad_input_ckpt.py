"""Damaged checkpoints, NaN stops, busy and reused workdirs: each gets one clear error (or the right
result), names the problem, and loses nothing the user had on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import folder, tiny_config as train_tiny_config  # noqa: F401 (a fixture)
from jaxft import checkpoint, paths, report, train
from jaxft.train import workdir as workdir_lib
from jaxft.train.errors import TrainError
from jaxft.train.monitor import TrainMonitor

REPO = Path(__file__).resolve().parents[1]


def tiny_config(folder: Path, cache: Path, **overrides):
  """test_train's tiny config (6 steps) with its data cache in ``cache``."""
  assert cache.name == "cache"
  return train_tiny_config(folder, cache.parent, **{"train.num_steps": 6, **overrides})


def snapshot(workdir: Path) -> dict[str, str]:
  """Every file of ``workdir`` (but the lock file, which each run rewrites) → its sha256."""
  return {p.relative_to(workdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != workdir_lib.LOCK_FILE}


def variables(path: Path) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in paths.flatten(checkpoint.load_model(path).variables).items()}


def assert_same_variables(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
  """An uninterrupted 6-step run."""
  tmp = tmp_path_factory.mktemp("straight")
  train.train_and_evaluate(tiny_config(folder, tmp / "cache"), tmp / "run")
  return tmp / "run"


@pytest.fixture(scope="module")
def four_steps(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
  """The same run stopped after step 4: checkpoints at steps 2 and 4 (copy before changing it)."""
  tmp = tmp_path_factory.mktemp("four")
  train.train_and_evaluate(tiny_config(folder, tmp / "cache", **{"train.num_steps": 4}), tmp / "run")
  assert checkpoint.saved_steps(tmp / "run") == [2, 4]
  return tmp / "run"


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints: detected by the checksums, reported by name, the intact step used.


def _largest(step_dir: Path, item: str = "variables") -> Path:
  return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
  f = _largest(step_dir)
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _flip(step_dir: Path) -> None:
  f = _largest(step_dir)
  data = bytearray(f.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))


def _delete_item(step_dir: Path) -> None:
  shutil.rmtree(step_dir / "variables")


DAMAGES = {"truncated": (_truncate, r"variables/\S+ is truncated \(\d+ of \d+ bytes\)"),
           "flipped": (_flip, r"variables/\S+ checksum mismatch"),
           "deleted_item": (_delete_item, r"item directory 'variables/' is missing")}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_latest_step_resumes_from_the_intact_one(kind, folder, straight, four_steps, tmp_path,
                                                         caplog):
  damage, message = DAMAGES[kind]
  wd = tmp_path / "run"
  shutil.copytree(four_steps, wd)
  damage(wd / "checkpoints" / "4")
  damaged = snapshot(wd / "checkpoints" / "4")
  caplog.set_level(logging.INFO)
  result = train.train_and_evaluate(tiny_config(folder, tmp_path / "cache"), wd)
  assert result["step"] == 6
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(re.search(rf"^step 4 is damaged: {message}; using step 2", w) for w in warnings), \
      warnings
  assert "resuming" in caplog.text and "from step 2" in caplog.text
  # Exact resume from step 2: the same final variables as the uninterrupted run.
  assert_same_variables(variables(straight), variables(wd))
  # Nothing lost: the damaged step is kept aside, as it was.
  assert snapshot(wd / checkpoint.DAMAGED_SUBDIR / "4") == damaged


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_load_model_passes_over_a_damaged_step_and_says_which_it_used(kind, four_steps, tmp_path,
                                                                        caplog):
  damage, message = DAMAGES[kind]
  wd = tmp_path / "run"
  shutil.copytree(four_steps, wd)
  chosen, _ = checkpoint.best_step(wd / "checkpoints")
  other = ({2, 4} - {chosen}).pop()
  damage(wd / "checkpoints" / str(chosen))
  before = snapshot(wd)
  model = checkpoint.load_model(wd)
  assert model.meta["checkpoint_step"] == other
  assert model.meta["weights"] in ("best", "latest") and model.meta["weights_item"] == "variables"
  assert re.search(rf"step {chosen} is damaged: {message}", model.meta["checkpoint_why"])
  assert f"step {chosen} is damaged" in caplog.text and f"using step {other}" in caplog.text
  assert_same_variables(variables(wd / "checkpoints" / str(other)),
                        {k: np.asarray(v) for k, v in paths.flatten(model.variables).items()})
  assert snapshot(wd) == before  # loading changes nothing on disk


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_every_step_damaged_is_one_clear_error(kind, folder, four_steps, tmp_path):
  damage, message = DAMAGES[kind]
  wd = tmp_path / "run"
  shutil.copytree(four_steps, wd)
  for step in (2, 4):
    damage(wd / "checkpoints" / str(step))
  before = snapshot(wd)
  with pytest.raises(TrainError, match=rf"no intact checkpoint to resume in .*checkpoints \(step 4: "
                                       rf"{message}; step 2: {message}\); nothing was changed") as e:
    train.train_and_evaluate(tiny_config(folder, tmp_path / "cache"), wd)
  assert e.value.exit_code == 4
  with pytest.raises(checkpoint.DamagedCheckpointError, match=rf"every checkpoint step in .* is damaged "
                                                              rf"\(step 4: {message}; step 2: "):
    checkpoint.load_model(wd)
  assert snapshot(wd) == before


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_saved_model_names_the_file(kind, four_steps, tmp_path):
  damage, message = DAMAGES[kind]
  ck = checkpoint.save_model(tmp_path / "ck", checkpoint.load_model(four_steps))
  damage(ck)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=rf"checkpoint .*ck is damaged: {message}"):
    checkpoint.load_model(ck)


def test_checksums_cover_every_file_and_survive_a_round_trip(four_steps, tmp_path):
  step = four_steps / "checkpoints" / "4"
  record = json.loads((step / checkpoint.CHECKSUMS_FILE).read_text())
  files = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
  assert set(record["files"]) == files - {checkpoint.CHECKSUMS_FILE}
  assert checkpoint.damage(step) is None
  model = checkpoint.load_model(step)
  assert model.meta["checkpoint_step"] == 4 and model.meta["weights"] == "step"
  again = checkpoint.load_model(checkpoint.save_model(tmp_path / "ck", model))
  assert again.meta["checkpoint_step"] is None and again.meta["weights"] == "saved"


# ---------------------------------------------------------------------------------------------------
# NaN stop: exit code 3, the last good (finite) step kept and named; metrics stay strict JSON.


def _strict(line: str):
  def refuse(name):
    raise ValueError(f"non-JSON constant {name} in {line!r}")
  return json.loads(line, parse_constant=refuse)


def test_metric_writer_writes_non_finite_numbers_as_null(tmp_path):
  w = report.MetricWriter(tmp_path, enabled=True)
  w.write(3, "val", {"loss": float("nan"), "top1": np.float32(np.inf), "top5": -math.inf,
                     "per_class": {"a": float("nan"), "b": 0.5}, "n": np.int64(4)})
  w.close()
  records = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records == [{"step": 3, "split": "val", "loss": None, "top1": None, "top5": None,
                      "per_class": {"a": None, "b": 0.5}, "n": 4}]
  assert report.read_metrics(tmp_path) == records


def test_resumed_run_drops_the_records_it_writes_again(tmp_path):
  w = report.MetricWriter(tmp_path, enabled=True)
  for step in (1, 2, 3):
    w.write(step, "train", {"loss": 0.5})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "split": "tr')  # torn by a kill -9
  assert report.MetricWriter(tmp_path, enabled=True).drop_after(2) == 2
  assert [r["step"] for r in report.read_metrics(tmp_path)] == [1, 2]


def test_nan_stop_keeps_the_last_finite_step(folder, tmp_path):
  wd = tmp_path / "run"
  every = {"train.checkpoint_every": 1, "train.eval_every": 1}
  train.train_and_evaluate(tiny_config(folder, tmp_path / "cache", **every, **{"train.num_steps": 2}), wd)
  config_json = (wd / workdir_lib.CONFIG_FILE).read_bytes()
  cfg = tiny_config(folder, tmp_path / "cache", **every, **{"optim.lr": 1e30, "train.num_steps": 8,
                                                            "train.allow_config_change": True})
  with pytest.raises(TrainError, match=r"at step (\d+); stopped. The last good checkpoint \(step (\d+)\) "
                                       r"is kept") as e:
    train.train_and_evaluate(cfg, wd)
  assert e.value.exit_code == 3
  steps = checkpoint.saved_steps(wd)
  kept = int(re.search(r"checkpoint \(step (\d+)\)", str(e.value)).group(1))
  assert steps and steps[-1] == kept
  for step in steps:  # every checkpoint kept: finite parameters and a finite validation loss
    model = checkpoint.load_model(wd / "checkpoints" / str(step))
    assert all(np.isfinite(np.asarray(v)).all() for v in paths.flatten(model.variables).values())
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  records = [_strict(line) for line in lines]
  val_loss = {r["step"]: r["loss"] for r in records if r["split"] == "val"}
  assert all(val_loss[s] is not None and math.isfinite(val_loss[s]) for s in steps)
  assert (wd / workdir_lib.CONFIG_FILE).read_bytes() == config_json  # the failed run rewrote nothing


def test_non_finite_validation_loss_stops_without_a_checkpoint(tmp_path):
  monitor = TrainMonitor(report.MetricWriter(tmp_path, enabled=False), None, batch_size=1,
                         total_steps=9, log_every=1, checkpoint_dir=tmp_path, last_good=4)
  monitor.check_val(5, {"loss": 0.3, "tasks": {"coarse": {"loss": 0.2}}})
  with pytest.raises(TrainError, match=r"the validation loss \(coarse head\) became nan at step 6; "
                                       r"stopped. The last good checkpoint \(step 4\)") as e:
    monitor.check_val(6, {"loss": 0.3, "tasks": {"coarse": {"loss": float("nan")}}})
  assert e.value.exit_code == 3
  with pytest.raises(TrainError, match=r"the EMA validation loss became inf at step 6"):
    monitor.check_val(6, {"loss": 0.3, "ema": {"loss": float("inf")}})


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
  f = np.float32
  state = train.TrainState.create({"head": {"kernel": np.array([1.0, np.nan], f)}}, {}, {},
                                  opt_state=(), ema=False)
  mngr = checkpoint.train_manager(tmp_path, 2)
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"variables/params/head/kernel holds a NaN"):
    checkpoint.save_train_state(mngr, state, None)
  mngr.close()
  assert checkpoint.saved_steps(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# One writer per workdir.


def test_second_run_on_a_busy_workdir_is_refused_at_once(folder, tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  with workdir_lib.WorkdirLock(wd):
    t0 = time.time()
    with pytest.raises(TrainError, match=rf"workdir {wd} is in use by pid {os.getpid()} on \S+ "
                                         r"\(since .*\); one run per workdir") as e:
      train.train_and_evaluate(tiny_config(folder, tmp_path / "cache"), wd)
    assert e.value.exit_code == 5 and time.time() - t0 < 5
    assert sorted(p.name for p in wd.iterdir()) == [workdir_lib.LOCK_FILE]  # nothing written
  # A lock left by a process that died (kill -9) holds nothing: the next run goes ahead.
  (wd / workdir_lib.LOCK_FILE).write_text("pid 999999 on elsewhere (since long ago)\n")
  assert train.train_and_evaluate(tiny_config(folder, tmp_path / "cache",
                                              **{"train.num_steps": 2}), wd)["step"] == 2


def _cli_args(folder: Path, tmp: Path, workdir: Path, steps: int) -> list[str]:
  return [sys.executable, "-m", "jaxft.train", "--config", "configs/tiny.py",
          f"--config.data.source=folder:{folder}", f"--config.data.cache_dir={tmp / 'cache'}",
          f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=10",
          "--config.train.eval_every=0", "--workdir", str(workdir)]


@pytest.mark.slow
def test_two_processes_on_one_workdir(folder, tmp_path):
  wd = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  first = subprocess.Popen(_cli_args(folder, tmp_path, wd, 60), cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lock = wd / workdir_lib.LOCK_FILE
  deadline = time.time() + 120
  while time.time() < deadline and not (lock.is_file() and f"pid {first.pid} " in lock.read_text()):
    time.sleep(0.05)
  t0 = time.time()
  second = subprocess.run(_cli_args(folder, tmp_path, wd, 60), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
  assert first.poll() is None, "the first run ended before the second started; raise num_steps"
  assert second.returncode == 5, second.stderr[-2000:]
  assert f"workdir {wd} is in use by pid {first.pid} on " in second.stderr
  assert "Traceback" not in second.stderr
  assert time.time() - t0 < 60
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  train_lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()
                 if json.loads(l)["split"] == "train"]
  assert [r["step"] for r in train_lines] == list(range(1, 61))


# ---------------------------------------------------------------------------------------------------
# config.json once the run has started, never rewritten; data identity.


@pytest.mark.parametrize("failure", [{"data.source": "folder:/no/such/folder"},
                                     {"model.arch": "cifar_resnet_nonsense"}])
def test_a_run_that_fails_before_starting_writes_no_config(failure, folder, tmp_path):
  wd = tmp_path / "run"
  with pytest.raises(Exception, match="no/such/folder|cifar_resnet_nonsense"):
    train.train_and_evaluate(tiny_config(folder, tmp_path / "cache", **failure), wd)
  assert not (wd / workdir_lib.CONFIG_FILE).exists() and not (wd / workdir_lib.DATA_FILE).exists()
  # So the workdir is not "written by a different config": the corrected command runs.
  assert train.train_and_evaluate(tiny_config(folder, tmp_path / "cache",
                                              **{"train.num_steps": 2}), wd)["step"] == 2


def test_failed_allow_config_change_attempt_rewrites_nothing(folder, four_steps, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(four_steps, wd)
  before = snapshot(wd)
  bad = {"model.arch": "cifar_resnet_nonsense", "train.allow_config_change": True}
  with pytest.raises(Exception, match="cifar_resnet_nonsense"):
    train.train_and_evaluate(tiny_config(folder, tmp_path / "cache", **bad), wd)
  assert snapshot(wd) == before
  # The workdir's own command still resumes it.
  assert train.train_and_evaluate(tiny_config(folder, tmp_path / "cache"), wd)["step"] == 6


def _change_one_image(folder: Path) -> None:
  f = folder / "red" / "000.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)


def _add_one_image(folder: Path) -> None:
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "red" / "999.png")


@pytest.mark.parametrize("change,message", [
    (_change_one_image, r"(train|val): the same \d+ images counted, different content"),
    (_add_one_image, r"(train|val): \d+ images of \['blue', 'red'\] → \d+ of \['blue', 'red'\]")])
def test_resuming_on_changed_data_is_refused_unless_allowed(change, message, folder, four_steps,
                                                            tmp_path):
  data = shutil.copytree(folder, tmp_path / "data")
  wd = tmp_path / "run"
  train.train_and_evaluate(tiny_config(data, tmp_path / "cache", **{"train.num_steps": 2}), wd)
  change(data)
  before = snapshot(wd)
  with pytest.raises(TrainError, match=rf"the data changed since workdir {wd} was trained on it "
                                       rf"\({message}.*allow_data_change=True") as e:
    train.train_and_evaluate(tiny_config(data, tmp_path / "cache", **{"train.num_steps": 4}), wd)
  assert e.value.exit_code == 2
  assert snapshot(wd) == before
  result = train.train_and_evaluate(
      tiny_config(data, tmp_path / "cache", **{"train.num_steps": 4, "train.allow_data_change": True}),
      wd)
  assert result["step"] == 4
  assert {k: before[k] for k in ("config.json", "data.json")} == {
      k: v for k, v in snapshot(wd).items() if k in ("config.json", "data.json")}
  changes = [json.loads(l) for l in (wd / workdir_lib.CHANGES_FILE).read_text().splitlines()]
  assert len(changes) == 1 and changes[0]["step"] == 2
  assert re.search(message, changes[0]["data"][0])
