"""The hyperparameter search (jaxft.sweep): space checks, the study's storage and clash checks, requeueing
a killed sweep's trials, pruning, the CLI's one-line errors, and end to end (kill -9 + rerun, PostgreSQL)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from configs import tiny
from jaxft.sweep import space as space_lib
from jaxft.sweep import storage as storage_lib
from jaxft.sweep import worker
from jaxft.train.errors import TrainError
from test_train import write_folder

REPO = Path(__file__).resolve().parents[1]
TINY_SPACE = REPO / "configs" / "tiny_space.py"
# The newest installed PostgreSQL (Debian/Ubuntu layout: /usr/lib/postgresql/<major>/bin).
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
             else 0, default=Path("/usr/lib/postgresql/15/bin"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return write_folder(tmp_path_factory.mktemp("data") / "tiny")


def _space() -> space_lib.Space:
  return space_lib.load_space(TINY_SPACE)


def _journal(tmp_path: Path) -> optuna.storages.BaseStorage:
  return storage_lib.open_storage(None, tmp_path)


# ---------------------------------------------------------------------------------------------------
# The space file.


def test_tiny_space_is_valid_and_with_params_never_mutates():
  base = tiny.get_config()
  assert space_lib.check_space(_space(), base) == []
  trial_config = space_lib.with_params(base, {"optim.lr": 0.05, "train.label_smoothing": 0.1})
  assert trial_config.optim.lr == 0.05 and trial_config.train.label_smoothing == 0.1
  assert base.optim.lr == tiny.get_config().optim.lr and base.train.label_smoothing == 0.0


def test_space_over_unknown_key_names_the_nearest():
  assert space_lib.check_space({"optim.lrr": FloatDistribution(0.1, 1.0)}, tiny.get_config()) == [
      "unknown config key 'optim.lrr'; nearest: optim.lr, optim.llrd, optim.lr_rules (every key: "
      "jaxft.config.default_config())"]


@pytest.mark.parametrize("key, dist, why", [
    ("train.batch_size", FloatDistribution(2.0, 8.0), "gives floats, but the field is int"),
    ("optim.name", IntDistribution(0, 3), "gives integers, but the field is str"),
    ("ema.decay", CategoricalDistribution([0.0, "x"]), "has the choice 'x' (str), but the field is float"),
    ("optim.lr", FloatDistribution(-0.1, 0.1), "reaches a refused value: config.optim.lr = -0.1: must be > 0"),
    ("optim.name", CategoricalDistribution(["sgd", "adamm"]), "reaches a refused value: config.optim.name"),
])
def test_space_distribution_of_the_wrong_type_or_range(key, dist, why):
  problems = space_lib.check_space({key: dist}, tiny.get_config())
  assert len(problems) == 1 and problems[0].startswith(f"{key}: {type(dist).__name__}(") and why in problems[0]


def test_space_value_that_is_no_distribution():
  assert space_lib.check_space({"optim.lr": [0.1, 0.2]}, tiny.get_config()) == [
      "optim.lr: [0.1, 0.2] is not an Optuna distribution; use FloatDistribution, IntDistribution or "
      "CategoricalDistribution (optuna.distributions)"]


def test_from_json_config_runs_a_saved_config(tmp_path):
  from configs import from_json  # pylint: disable=g-import-not-at-top
  saved = space_lib.with_params(tiny.get_config(), {"optim.lr": 0.0123})
  (tmp_path / "c.json").write_text(saved.to_json(indent=2))
  loaded = from_json.get_config(str(tmp_path / "c.json"))
  assert loaded.to_json() == saved.to_json() and loaded.is_locked
  (tmp_path / "bad.json").write_text(json.dumps({"optim": {"lrr": 1.0}}))
  with pytest.raises(KeyError, match="lrr"):
    from_json.get_config(str(tmp_path / "bad.json"))


def test_space_over_a_config_without_validation_is_refused():
  base = space_lib.with_params(tiny.get_config(), {"data.val_fraction": 0.0})
  assert space_lib.check_space(_space(), base) == [
      "trials are scored by validation top-1, and the config has no validation set: set "
      "config.data.val_fraction > 0 or config.data.val_source"]


def test_a_second_sweep_in_the_same_dir_is_refused(tmp_path):
  with storage_lib.SweepLock(tmp_path):
    with pytest.raises(TrainError, match=r"is in use by another sweep") as e:
      with storage_lib.SweepLock(tmp_path, wait_s=0.2):
        pass
  assert e.value.exit_code == 5
  with storage_lib.SweepLock(tmp_path, wait_s=0.2):  # free again
    pass


def test_space_file_problems(tmp_path):
  (tmp_path / "none.py").write_text("X = 1\n")
  (tmp_path / "list.py").write_text("def get_space():\n  return [1]\n")
  with pytest.raises(space_lib.SpaceError, match=r"defines no get_space\(\)"):
    space_lib.load_space(tmp_path / "none.py")
  with pytest.raises(space_lib.SpaceError, match=r"returned list; it must return a non-empty dict"):
    space_lib.load_space(tmp_path / "list.py")
  with pytest.raises(space_lib.SpaceError, match="not found"):
    space_lib.load_space(tmp_path / "missing.py")


# ---------------------------------------------------------------------------------------------------
# The study: storage, clashes, requeueing, the trial budget, pruning.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_or_malformed_storage_is_one_clear_error(tmp_path):
  url = f"postgresql://me:s3cret@127.0.0.1:{_free_port()}/db"
  t0 = time.time()
  with pytest.raises(TrainError, match=r"cannot open the study storage .*check the URL, that the server runs") as e:
    storage_lib.open_storage(url, tmp_path)
  assert time.time() - t0 < 30 and "s3cret" not in str(e.value) and "127.0.0.1" in str(e.value)
  if importlib.util.find_spec("psycopg"):  # with the driver, the server itself is what is missing
    assert "OperationalError" in str(e.value)
  with pytest.raises(TrainError, match="not a database URL"):
    storage_lib.open_storage("my_study.db", tmp_path)
  assert list(tmp_path.iterdir()) == []  # nothing written


def test_study_clash_with_a_different_space_or_config_loses_nothing(tmp_path):
  storage, base, pruner = _journal(tmp_path), tiny.get_config(), optuna.pruners.NopPruner()
  study = storage_lib.open_study(storage, "s", _space(), base, pruner)
  study.tell(study.ask(_space()), 0.5)
  other = {**_space(), "optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}
  with pytest.raises(TrainError, match=r"study 's' already exists with a different space \(optim.lr was "
                     r"FloatDistribution\(low=0.001, high=0.3, log=True\), now FloatDistribution\(low=0.0001"):
    storage_lib.open_study(storage, "s", other, base, pruner)
  with pytest.raises(TrainError, match=r"different space \(optim.momentum is new\)"):
    storage_lib.open_study(storage, "s", {**_space(), "optim.momentum": FloatDistribution(0.5, 0.9)}, base,
                           pruner)
  changed = space_lib.with_params(base, {"train.num_steps": 9})
  with pytest.raises(TrainError, match=r"different base config \(changed: train.num_steps\)"):
    storage_lib.open_study(storage, "s", _space(), changed, pruner)
  again = storage_lib.open_study(_journal(tmp_path), "s", _space(), base, pruner)  # the same space: continues
  assert [t.value for t in again.trials] == [0.5]
  assert again.user_attrs[storage_lib.SPACE_ATTR] == space_lib.space_json(_space())


def test_requeue_resumes_own_running_trials_under_the_same_number(tmp_path):
  storage = _journal(tmp_path)
  study = storage_lib.open_study(storage, "s", _space(), tiny.get_config(), optuna.pruners.NopPruner())
  me, lock = storage_lib.owner(tmp_path), tmp_path / "claim.lock"
  mine = worker.claim(study, _space(), 5, me, lock)  # killed while running
  theirs = study.ask(_space())
  theirs.set_user_attr(storage_lib.OWNER_ATTR, "elsewhere:/sweep")
  ownerless = study.ask(_space())  # killed before it was tagged
  assert storage_lib.requeue_own_trials(storage, study, me, claim_ownerless=False) == [mine.number]
  states = {t.number: t.state for t in study.get_trials()}
  assert states == {mine.number: TrialState.WAITING, theirs.number: TrialState.RUNNING,
                    ownerless.number: TrialState.RUNNING}
  again = worker.claim(study, _space(), 5, me, lock)
  assert again.number == mine.number and again.params == mine.params  # same trial, same workdir
  assert worker.trial_dir(tmp_path, again.number) == worker.trial_dir(tmp_path, mine.number)
  assert storage_lib.requeue_own_trials(storage, study, me, claim_ownerless=True) == [mine.number,
                                                                                      ownerless.number]


def test_requeue_takes_a_silent_machine_s_trials_for_dead_and_a_heartbeat_keeps_them(tmp_path):
  storage = _journal(tmp_path)
  study = storage_lib.open_study(storage, "s", _space(), tiny.get_config(), optuna.pruners.NopPruner())
  silent, alive = study.ask(_space()), study.ask(_space())
  for t in (silent, alive):
    t.set_user_attr(storage_lib.OWNER_ATTR, "elsewhere:/sweep")
  silent.set_user_attr(storage_lib.HEARTBEAT_ATTR, time.time() - 700)
  with worker.Heartbeat(alive, every_s=0.05):
    time.sleep(0.3)
  beat = study.trials[alive.number].user_attrs[storage_lib.HEARTBEAT_ATTR]
  assert time.time() - beat < 1 and storage_lib.last_beat(study.trials[alive.number]) == beat
  me = storage_lib.owner(tmp_path)
  assert storage_lib.requeue_own_trials(storage, study, me, claim_ownerless=False) == []
  assert storage_lib.requeue_own_trials(storage, study, me, False, stale_s=600) == [silent.number]
  assert [t.state for t in study.get_trials()] == [TrialState.WAITING, TrialState.RUNNING]


def test_claim_stops_at_the_budget_and_counts_diverged_but_not_failed(tmp_path):
  storage = _journal(tmp_path)
  study = storage_lib.open_study(storage, "s", _space(), tiny.get_config(), optuna.pruners.NopPruner())
  me, lock = storage_lib.owner(tmp_path), tmp_path / "claim.lock"
  a = worker.claim(study, _space(), 3, me, lock)
  study.tell(a, 0.5)
  b = worker.claim(study, _space(), 3, me, lock)
  b.set_user_attr(storage_lib.DIVERGED_ATTR, True)
  study.tell(b, state=TrialState.FAIL)
  c = worker.claim(study, _space(), 3, me, lock)
  study.tell(c, state=TrialState.FAIL)  # an error the user fixes: replaced
  d = worker.claim(study, _space(), 3, me, lock)
  study.tell(d, state=TrialState.PRUNED)
  assert worker.claim(study, _space(), 3, me, lock) is None
  assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]


def test_reporter_reports_top1_and_prunes_weak_trials(tmp_path):
  study = storage_lib.open_study(_journal(tmp_path), "s", _space(), tiny.get_config(),
                                 optuna.pruners.MedianPruner(n_startup_trials=1))
  strong = study.ask(_space())
  on_eval = worker._reporter(strong)  # pylint: disable=protected-access
  on_eval(2, {"top1": 0.9})
  on_eval(2, {"top1": 0.9})  # a resumed trial evaluates step 2 again: reported once
  study.tell(strong, 0.9)
  weak = study.ask(_space())
  with pytest.raises(optuna.TrialPruned, match=r"pruned at step 2 \(val top-1 0.1000\)"):
    worker._reporter(weak)(2, {"top1": 0.1})  # pylint: disable=protected-access
  assert study.trials[0].intermediate_values == {2: 0.9} and study.trials[1].intermediate_values == {2: 0.1}


# ---------------------------------------------------------------------------------------------------
# The command line.


def _sweep_cmd(folder: Path, sweep_dir: Path, *extra: str, space: Path = TINY_SPACE) -> list[str]:
  return [sys.executable, "-m", "jaxft.sweep", "--config", str(REPO / "configs" / "tiny.py"),
          "--space", str(space), "--study", "tiny", "--workdir", str(sweep_dir),
          f"--config.data.source=folder:{folder}", f"--config.data.cache_dir={sweep_dir.parent / 'cache'}",
          *extra]


def _env() -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def test_cli_bad_space_is_one_line_and_exit_2(folder, tmp_path):
  bad = tmp_path / "bad_space.py"
  bad.write_text("from optuna.distributions import FloatDistribution\n"
                 "def get_space():\n  return {'train.batch_sise': FloatDistribution(1, 4)}\n")
  r = _run(_sweep_cmd(folder, tmp_path / "sweep", "--trials=2", space=bad))
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
      f"error: space file {bad}: unknown config key 'train.batch_sise'; nearest: train.batch_size, "
      "train.eval_batch_size, train.epochs (every key: jaxft.config.default_config())"]
  assert not (tmp_path / "sweep").exists()


def test_cli_clash_and_unreachable_storage_keep_the_study(folder, tmp_path):
  sweep_dir = tmp_path / "sweep"
  sweep_dir.mkdir()
  base = space_lib.with_params(tiny.get_config(), {"data.source": f"folder:{folder}",
                                                   "data.cache_dir": str(tmp_path / "cache")})
  other = {"optim.lr": FloatDistribution(1e-4, 1e-2)}
  study = storage_lib.open_study(_journal(sweep_dir), "tiny", other, base, optuna.pruners.NopPruner())
  study.tell(study.ask(other), 0.25)
  before = (sweep_dir / storage_lib.JOURNAL_FILE).read_bytes()
  r = _run(_sweep_cmd(folder, sweep_dir, "--trials=2"))
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: study 'tiny' already exists with a different space (")
  assert (sweep_dir / storage_lib.JOURNAL_FILE).read_bytes() == before
  r = _run(_sweep_cmd(folder, sweep_dir, "--trials=2", f"--storage=postgresql://x@127.0.0.1:{_free_port()}/x"))
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "cannot open the study storage" in r.stderr and "Traceback" not in r.stderr


def test_cli_trial_error_that_would_repeat_stops_the_sweep(tmp_path):
  empty = tmp_path / "empty"
  (empty / "a").mkdir(parents=True)
  (empty / "b").mkdir()
  sweep_dir = tmp_path / "sweep"
  r = _run(_sweep_cmd(empty, sweep_dir, "--trials=3"))
  assert r.returncode == 2, r.stdout + r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: trial 0: "), r.stderr
  study = optuna.load_study(study_name="tiny", storage=storage_lib.open_storage(None, sweep_dir))
  [t] = study.trials  # failed, recorded, and not counted: a rerun after the fix replaces it
  assert t.state == TrialState.FAIL and t.user_attrs[storage_lib.ERROR_ATTR] == errors[0][len("error: trial 0: "):]
  assert not storage_lib.counted(t)


# ---------------------------------------------------------------------------------------------------
# End to end.


def _wait_for(cond, timeout: float, what: str) -> None:
  t0 = time.time()
  while not cond():
    if time.time() - t0 > timeout:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.2)


def _group_gone(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
  except ProcessLookupError:
    return True
  return False


def _check_done(study: optuna.Study, n: int, sweep_dir: Path) -> None:
  """``n`` trials, numbered 0..n-1 once each, every one complete or pruned, each complete one with the
  top-1 of every evaluation (steps 2 and 4) and its best as value; the outputs written."""
  trials = study.get_trials()
  assert sorted(t.number for t in trials) == list(range(n))
  assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
  for t in trials:
    if t.state == TrialState.COMPLETE:
      assert sorted(t.intermediate_values) == [2, 4] and t.value == max(t.intermediate_values.values())
  rows = list(csv.DictReader(open(sweep_dir / "results.csv", encoding="utf-8")))
  assert [int(r["trial"]) for r in rows] == list(range(n))
  assert (sweep_dir / "optimization_history.png").stat().st_size > 1000
  best = json.loads((sweep_dir / "best_config.json").read_text())
  assert best["optim"]["lr"] == study.best_trial.params["optim.lr"]


@pytest.mark.slow
def test_sweep_killed_mid_way_and_rerun_finishes_without_duplicates(folder, tmp_path):
  sweep_dir = tmp_path / "sweep"
  cmd = _sweep_cmd(folder, sweep_dir, "--trials=6", "--workers=2")
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                       start_new_session=True)
  study = lambda: optuna.load_study(study_name="tiny", storage=storage_lib.open_storage(None, sweep_dir))
  # Mid-way: some trial has finished and another has a checkpoint and is running.
  def mid_way() -> bool:
    if p.poll() is not None:
      raise AssertionError(p.stdout.read().decode())
    if not (sweep_dir / storage_lib.JOURNAL_FILE).exists():
      return False
    ts = study().get_trials()
    return (any(t.state.is_finished() for t in ts) and any(
        t.state == TrialState.RUNNING and (worker.trial_dir(sweep_dir, t.number) / "checkpoints" / "2").is_dir()
        for t in ts))
  _wait_for(mid_way, 400, "a finished trial and a running one with a checkpoint")
  os.kill(p.pid, signal.SIGKILL)  # the coordinator only: its workers must die with it
  p.wait()
  _wait_for(lambda: _group_gone(p.pid), 30, "the workers to die with the sweep")
  running = [t.number for t in study().get_trials() if t.state == TrialState.RUNNING]
  assert running

  r = _run(cmd, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert f"trial(s) {', '.join(map(str, running))} were left running by a stopped sweep" in r.stdout
  _check_done(study(), 6, sweep_dir)
  logs = "".join(p.read_text() for p in (sweep_dir / "logs").iterdir())
  assert "resuming" in logs  # a requeued trial continued from its checkpoint


def _postgres(tmp_path: Path) -> tuple[str, list[str]]:
  """Starts a throwaway PostgreSQL cluster on a free 127.0.0.1 port; returns its URL and the command
  prefix that runs its tools (root runs them as the ``postgres`` user: postgres refuses root)."""
  if not (PG_BIN / "initdb").exists():
    pytest.skip(f"PostgreSQL not installed ({PG_BIN}/initdb missing): apt-get install postgresql")
  prefix: list[str] = []
  if os.geteuid() == 0:
    if not shutil.which("runuser"):
      pytest.skip("running as root and runuser is missing: postgres refuses to run as root")
    try:
      import pwd  # pylint: disable=g-import-not-at-top
      pwd.getpwnam("postgres")
    except KeyError:
      pytest.skip("running as root and there is no 'postgres' user to run the server as")
    prefix = ["runuser", "-u", "postgres", "--"]
  data = Path(f"/tmp/jaxft_pg_{os.getpid()}_{_free_port()}")  # under /tmp: the postgres user must reach it
  data.mkdir(mode=0o700)
  if prefix:
    shutil.chown(data, "postgres")
  port = _free_port()
  subprocess.run(prefix + [str(PG_BIN / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                 check=True, capture_output=True, timeout=120)
  subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o",
                           f"-p {port} -k {data} -h 127.0.0.1", "start"], check=True, capture_output=True,
                 timeout=120)
  return f"postgresql://postgres@127.0.0.1:{port}/postgres", prefix + [str(PG_BIN / "pg_ctl"), "-D",
                                                                         str(data / "db"), "-m", "immediate",
                                                                         "stop"]


@pytest.mark.slow
def test_sweep_on_a_real_postgresql_server(folder, tmp_path):
  pytest.importorskip("psycopg", reason="psycopg (jaxft[sweep]) is needed for PostgreSQL")
  url, stop = _postgres(tmp_path)
  try:
    r = _run(_sweep_cmd(folder, tmp_path / "sweep", "--trials=2", "--workers=2", f"--storage={url}"))
    assert r.returncode == 0, r.stdout + r.stderr
    study = optuna.load_study(study_name="tiny", storage=url)
    _check_done(study, 2, tmp_path / "sweep")
    assert study.user_attrs[storage_lib.SPACE_ATTR] == space_lib.space_json(_space())
    assert not (tmp_path / "sweep" / storage_lib.JOURNAL_FILE).exists()
  finally:
    subprocess.run(stop, capture_output=True, timeout=60)
    shutil.rmtree(Path(stop[-4]).parent, ignore_errors=True)
