"""Low-data runs: ``data.per_class`` (N training images per class, validation from the rest) and the
study tool ``tools/low_data_study.py`` on a tiny generated folder."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import override
from configs import tiny
from jaxft import data
from jaxft.data import DataError, Dataset
from jaxft.train import setup

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import low_data_study as study  # noqa: E402  (a tool, not a package)


def _indexed(counts: list[int]) -> Dataset:
  """A dataset whose image ``i`` holds ``i`` in its first byte: examples are identified by value."""
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(counts)])
  images = np.zeros((len(labels), 1, 1, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels))
  return Dataset(images, labels, tuple(f"c{c}" for c in range(len(counts))))


def _ids(ds: Dataset) -> set[int]:
  return set(ds.images[:, 0, 0, 0].tolist())


def test_take_per_class_exact_counts_disjoint_deterministic_nested():
  ds = _indexed([7, 9, 12])
  taken, rest = data.take_per_class(ds, 5, seed=3)
  assert np.bincount(taken.labels).tolist() == [5, 5, 5]
  assert np.bincount(rest.labels).tolist() == [2, 4, 7]
  assert not _ids(taken) & _ids(rest) and _ids(taken) | _ids(rest) == _ids(ds)
  # Labels travel with their images.
  assert all(ds.labels[i] == l for i, l in zip(taken.images[:, 0, 0, 0], taken.labels))
  again, _ = data.take_per_class(ds, 5, seed=3)
  assert np.array_equal(again.images, taken.images)
  other, _ = data.take_per_class(ds, 5, seed=4)
  assert _ids(other) != _ids(taken)
  smaller, _ = data.take_per_class(ds, 2, seed=3)
  assert _ids(smaller) < _ids(taken)  # one seed: the 2 per class are among the 5 per class
  assert np.array_equal(ds.images[:, 0, 0, 0], np.arange(28))  # not mutated


def test_take_per_class_refuses_a_short_class_naming_it():
  with pytest.raises(DataError, match=r"data.per_class=8 .*'c0' \(7\).*at most 7"):
    data.take_per_class(_indexed([7, 9, 12]), 8, seed=0)
  with pytest.raises(ValueError, match="positive int"):
    data.take_per_class(_indexed([3, 3]), 0, seed=0)


def _write_folder(root: Path, counts: dict[str, int]) -> Path:
  """Class folders of 8×8 PNGs, each image distinct (its index in two pixels)."""
  k = 0
  for name, n in counts.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      img = np.full((8, 8, 3), 40 * len(name) % 256, np.uint8)
      img[0, 0, :2] = (k // 256, k % 256)
      Image.fromarray(img).save(root / name / f"{i:03d}.png")
      k += 1
  return root


def _config(folder: Path, tmp: Path, **overrides):
  c = tiny.get_config()
  c.data.source = f"folder:{folder}"
  c.data.cache_dir = str(tmp / "cache")
  return override(c, **overrides)


def _keys(ds: Dataset) -> set[bytes]:
  return {img.tobytes() for img in ds.images}


def test_load_data_per_class_trains_on_n_and_validates_on_a_share_of_the_rest(tmp_path):
  folder = _write_folder(tmp_path / "d", {"a": 12, "b": 14})
  train_ds, val_ds = setup.load_data(_config(folder, tmp_path, **{"data.per_class": 3,
                                                                  "data.val_fraction": 0.25}))
  assert np.bincount(train_ds.labels).tolist() == [3, 3]
  # 25% of what is left: round(9 * 0.25) = 2 of a, round(11 * 0.25) = 3 of b.
  assert np.bincount(val_ds.labels).tolist() == [2, 3]
  assert not _keys(train_ds) & _keys(val_ds)
  again, val_again = setup.load_data(_config(folder, tmp_path, **{"data.per_class": 3,
                                                                  "data.val_fraction": 0.25}))
  assert np.array_equal(again.images, train_ds.images) and np.array_equal(val_again.images, val_ds.images)
  other, _ = setup.load_data(_config(folder, tmp_path, **{"data.per_class": 3, "data.val_fraction": 0.25,
                                                          "data.split_seed": 1}))
  assert _keys(other) != _keys(train_ds)
  # per_class = 0 keeps today's split: everything not held out trains.
  full, full_val = setup.load_data(_config(folder, tmp_path, **{"data.val_fraction": 0.25}))
  assert np.bincount(full.labels).tolist() == [9, 10] and np.bincount(full_val.labels).tolist() == [3, 4]


def test_load_data_per_class_larger_than_a_class_is_one_clear_error(tmp_path):
  folder = _write_folder(tmp_path / "d", {"a": 4, "b": 9})
  with pytest.raises(DataError, match=r"data.per_class=5 .*'a' \(4\); lower data.per_class to at most 4"):
    setup.load_data(_config(folder, tmp_path, **{"data.per_class": 5}))


def test_config_refuses_a_negative_per_class():
  from jaxft import validate
  c = tiny.get_config()
  c.data.per_class = -1
  assert any(p.startswith("config.data.per_class = -1") for p in validate.validate(c, check_files=False))


# ---------------------------------------------------------------------------------------------------
# The study tool.


def test_table_is_mean_and_sample_std_over_seeds():
  rows = [{"method": "none", "per_class": 10, "seed": s, "top1": t} for s, t in enumerate([0.4, 0.5, 0.9])]
  rows += [{"method": "l2sp", "per_class": 10, "seed": 0, "top1": 0.25}]
  summary = study.summarize(rows)
  assert summary[("none", 10)][0] == pytest.approx(0.6)
  assert summary[("none", 10)][1] == pytest.approx(statistics.stdev([0.4, 0.5, 0.9]))  # ddof = 1: 0.2646
  assert summary[("l2sp", 10)] == (0.25, 0.0, 1)
  table = study.markdown_table(rows)
  assert "| none | 60.0 ± 26.5 |" in table and "| l2sp | 25.0 ± 0.0 (1 seeds) |" in table


def _args(*extra: str) -> list[str]:
  return ["--workdir", "/nonexistent/never-made", "--config", str(REPO / "configs" / "tiny.py"), *extra]


@pytest.mark.parametrize("extra,message", [
    (("--methods", "none,ridge"), "unknown method(s) ridge; known: none, l2sp"),
    (("--per-class", "10,x"), "--per-class must be comma-separated integers"),
    (("--per-class", "0"), "--per-class must be positive"),
    (("--seeds", "-1"), "--seeds must list non-negative integers"),
])
def test_tool_bad_flags_are_one_line_before_anything_runs(extra, message, capsys):
  assert study.main(_args(*extra)) == study.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
  assert not Path("/nonexistent/never-made").exists()


def test_tool_method_with_a_key_this_jaxft_lacks_fails_clearly(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(study.METHODS, "future", {"loss.not_merged_yet": 0.1})
  folder = _write_folder(tmp_path / "d", {"a": 4, "b": 4})
  assert study.main(_args("--methods", "future", "--data", f"folder:{folder}")) == study.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert "method 'future' sets config.loss.not_merged_yet, but this jaxft's config has no " \
         "loss.not_merged_yet" in err
  monkeypatch.setitem(study.METHODS, "typed", {"train.batch_size": "big"})
  assert study.main(_args("--methods", "typed", "--data", f"folder:{folder}")) == study.EXIT_BAD_INPUT
  assert "method 'typed' sets config.train.batch_size = 'big', which it refuses" in capsys.readouterr().err


def test_tool_missing_data_fails_before_any_run(capsys):
  assert study.main(_args("--methods", "none", "--data", "folder:/nonexistent/data")) == 2
  err = capsys.readouterr().err
  assert "none/n10/seed0: config.data.source" in err and "/nonexistent/data" in err


def test_tool_skips_a_finished_run_only_with_the_same_config(tmp_path):
  base = study.load_config(REPO / "configs" / "tiny.py")
  config = study.run_config(base, "none", 2, 0, 2, "folder:/x")
  run_dir = tmp_path / "none" / "n2" / "seed0"
  run_dir.mkdir(parents=True)
  row = {"method": "none", "per_class": 2, "seed": 0, "top1": 0.75}
  (run_dir / study.RUN_FILE).write_text(json.dumps(dict(row, config=json.loads(config.to_json()))))
  assert study.run_one(tmp_path, "none", 2, 0, config) == dict(row, skipped=True)
  # Another step budget (which the train loop itself would resume into) is not the same result.
  longer = study.run_config(base, "none", 2, 0, 3, "folder:/x")
  with pytest.raises(study.StudyError, match=r"another config \(train.num_steps: 2 -> 3\); use a new"):
    study.run_one(tmp_path, "none", 2, 0, longer)
  assert base.train.num_steps == 4 and base.data.per_class == 0  # run_config copies


@pytest.mark.slow
def test_tool_runs_a_tiny_study_writes_the_table_and_skips_finished_runs(tmp_path):
  folder = _write_folder(tmp_path / "d", {"a": 10, "b": 10})
  workdir = tmp_path / "study"
  cmd = [sys.executable, str(REPO / "tools" / "low_data_study.py"), *_args()[2:], "--workdir", str(workdir),
         "--methods", "none,l2sp", "--per-class", "2,4", "--seeds", "0", "--steps", "2",
         "--data", f"folder:{folder}"]
  env = dict(os.environ, JAXFT_CACHE_DIR=str(tmp_path / "cache"))
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / "results.csv")))
  assert [(x["method"], x["per_class"]) for x in rows] == [("none", "2"), ("none", "4"), ("l2sp", "2"),
                                                          ("l2sp", "4")]
  for x in rows:
    run = workdir / x["method"] / f"n{x['per_class']}" / "seed0"
    final = json.loads((run / "final_metrics.json").read_text())
    assert float(x["top1"]) == pytest.approx(final["top1"]) and int(x["steps"]) == 2
    # tiny: val_fraction 0.25 of the 10 - N images left per class.
    assert int(x["n_val"]) == 2 * round((10 - int(x["per_class"])) * 0.25)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["per_class"] == int(x["per_class"]) and config["seed"] == 0
    assert config["optim"]["l2sp"]["alpha"] == study.METHODS[x["method"]]["optim.l2sp.alpha"]
  table = (workdir / "table.md").read_text()
  assert table.startswith("| method | 2 / class | 4 / class |") and table in r.stdout
  mean = 100 * float(rows[0]["top1"])
  assert f"| none | {mean:.1f} ± 0.0 |" in table
  summary = json.loads((workdir / "results.json").read_text())["summary"]
  assert {(s["method"], s["per_class"]) for s in summary} == {("none", 2), ("none", 4), ("l2sp", 2),
                                                             ("l2sp", 4)}
  # A rerun trains nothing: every run is read back from its record.
  before = (workdir / "none" / "n2" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("(done before)") == 4
  assert (workdir / "none" / "n2" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == before
  assert (workdir / "table.md").read_text() == table
