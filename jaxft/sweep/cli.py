"""``python -m jaxft.sweep --config configs/X.py --space configs/X_space.py --study NAME [--storage URL]
--trials N [--workers K] [--workdir DIR] [--config.a.b=v …]``: a hyperparameter search on Optuna.

The command (the *coordinator*) checks the config, the space and the study, puts back in the queue the
trials a killed run of this sweep dir left running, starts K *worker* processes (this same command with
``--worker=I``; each takes trials from the study and trains them, :mod:`jaxft.sweep.worker`), prints
each trial as it ends and, at the end, the results (:mod:`jaxft.sweep.results`). The ``--config.a.b=v``
overrides are those of ``python -m jaxft.train`` (its flag parsing is reused) and apply to every trial;
the space's sampled values are set on top. Exit codes are the train CLI's: 0 done, 2 bad input, 5 the
sweep dir is busy, 75 interrupted (rerun the same command to continue), 1 a bug.

Workers die with the coordinator (``PR_SET_PDEATHSIG``, Linux), so a ``kill -9`` of the sweep leaves no
worker behind; a rerun resumes each interrupted trial from its checkpoint under the same number.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from jaxft import cpu
from jaxft.train import cli as train_cli
from jaxft.train import errors
from jaxft.train.errors import TrainError

POLL_S = 1.0  # how often the coordinator looks at its workers and the study
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
HEARTBEATS_PER_STALE = 5  # a live trial misses this many heartbeats in a row before it is taken for dead


def define_flags() -> None:
  """The train CLI's ``--config`` / ``--workdir`` / ``--debug`` and the sweep's own flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  train_cli.define_flags()
  flags.DEFINE_string("space", None, "A space file: get_space() -> {config key: optuna distribution}.")
  flags.DEFINE_string("study", None, "The Optuna study's name (created, or continued if it exists).")
  flags.DEFINE_string("storage", "", "An Optuna RDB URL (postgresql://…, mysql://…, sqlite:///…); default: "
                      "a journal file in the sweep dir.")
  flags.DEFINE_integer("trials", None, "Trials to run in all (complete, pruned or diverged).", lower_bound=1)
  flags.DEFINE_integer("workers", 1, "Worker processes on this machine.", lower_bound=1)
  flags.DEFINE_integer("startup_trials", 5, "Trials that finish before the median pruner stops any.",
                       lower_bound=0)
  flags.DEFINE_integer("stale_after", 600, "With --storage: a running trial whose heartbeat is older than "
                       "this many seconds is taken for dead (its machine) and requeued.", lower_bound=60)
  flags.DEFINE_integer("worker", None, "Internal: run as worker I of a sweep.")


def _fail(lines: list[str], code: int) -> NoReturn:
  for line in lines:
    print(f"error: {line}", file=sys.stderr)
  sys.exit(code)


def _inputs(f: Any) -> tuple[Any, Any, Path]:
  """``(config, space, sweep dir)`` from the flags, all checked.

  Raises:
    TrainError: a missing flag, an invalid config, or a space that cannot be searched (exit code 2).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxft.sweep import space as space_lib  # pylint: disable=g-import-not-at-top
  missing = [n for n in ("space", "study", "trials") if f[n].value in (None, "")]
  if missing:
    raise TrainError("; ".join(f"--{n} is required" for n in missing) + " (python -m jaxft.sweep --help)")
  config = f.config
  if not isinstance(config, ml_collections.ConfigDict):
    raise TrainError(f"config file {f['config'].config_filename}: get_config() returned "
                     f"{type(config).__name__}, not an ml_collections.ConfigDict")
  errors.check_config(config)
  try:
    space = space_lib.load_space(f.space)
  except space_lib.SpaceError as e:
    raise TrainError(str(e)) from None
  problems = space_lib.check_space(space, config)
  if problems:
    raise TrainError("\n".join(f"space file {f.space}: {p}" for p in problems))
  return config, space, Path(f.workdir or Path("runs", f.study)).absolute()


def _pruner(f: Any) -> Any:
  import optuna  # pylint: disable=g-import-not-at-top
  return optuna.pruners.MedianPruner(n_startup_trials=f.startup_trials)


def _die_with_parent(parent: int) -> None:
  """In a worker before it execs: the kernel kills it when the coordinator (pid ``parent``) dies, even by
  SIGKILL; if it died before this call, the worker exits at once."""
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:
    os._exit(1)  # pylint: disable=protected-access


def _start_workers(k: int, lock_fd: int, sweep_dir: Path) -> list[subprocess.Popen]:
  """Starts ``k`` workers (this command plus ``--worker=I``), each logging to ``logs/worker<I>.log``;
  they inherit the sweep dir's lock."""
  (sweep_dir / "logs").mkdir(exist_ok=True)
  procs = []
  for i in range(k):
    log = open(sweep_dir / "logs" / f"worker{i}.log", "ab")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, "-m", "jaxft.sweep", *sys.argv[1:], f"--worker={i}"],
                                  stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock_fd,),
                                  preexec_fn=(functools.partial(_die_with_parent, os.getpid())
                                              if sys.platform == "linux" else None)))
    log.close()
  return procs


def _trial_line(t: Any) -> str:
  from jaxft.sweep import results  # pylint: disable=g-import-not-at-top
  top1 = results.best_top1(t)
  return (f"trial {t.number}: {t.state.name.lower()}, best val top-1 "
          f"{'-' if top1 is None else f'{top1:.4f}'} {t.params}")


def _wait(procs: list[subprocess.Popen], study: Any, sweep_dir: Path) -> tuple[int, list[str]]:
  """Waits for the workers, printing each trial as it finishes. SIGINT/SIGTERM, or a worker failing,
  stops the others (SIGTERM: each saves its trial's checkpoint). Returns the sweep's exit code and the
  failing worker's error lines."""
  stop: list[int] = []
  old = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
  shown = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
  code, lines, stopping = 0, [], False
  try:
    while any(p.poll() is None for p in procs):
      time.sleep(POLL_S)
      for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in shown:
          shown.add(t.number)
          print(_trial_line(t), flush=True)
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if (stop or failed) and not stopping:
        stopping = True
        code = errors.EXIT_INTERRUPTED if stop else _exit_code(failed[0][1])
        lines = [] if stop else _error_lines(sweep_dir, *failed[0])
        for p in procs:
          if p.poll() is None:
            p.send_signal(signal.SIGTERM)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  if not stopping:
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if bad:
      code, lines = _exit_code(bad[0][1]), _error_lines(sweep_dir, *bad[0])
  return code, lines


def _exit_code(returncode: int) -> int:
  """A worker's exit status as the sweep's exit code: 128 + N when signal N killed it."""
  return 128 - returncode if returncode < 0 else returncode


def _error_lines(sweep_dir: Path, i: int, returncode: int) -> list[str]:
  """The ``error:`` lines worker ``i`` ended with (its log's tail otherwise)."""
  if returncode < 0:
    return [f"worker {i} was killed by signal {-returncode} ({signal.Signals(-returncode).name}); its trial "
            "resumes from its checkpoint when you rerun the same command"]
  log = (sweep_dir / "logs" / f"worker{i}.log").read_text(errors="replace").splitlines()
  found = [l[len("error: "):] for l in log if l.startswith("error: ")]
  return found[-5:] or [f"worker {i} failed; see {sweep_dir / 'logs' / f'worker{i}.log'}"]


def _coordinate(f: Any, config: Any, space: Any, sweep_dir: Path) -> tuple[int, list[str]]:
  """The coordinator: study, requeue, workers, results (module docstring)."""
  from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top
  from jaxft.sweep import results  # pylint: disable=g-import-not-at-top
  from jaxft.sweep import storage as storage_lib  # pylint: disable=g-import-not-at-top
  sweep_dir.mkdir(parents=True, exist_ok=True)
  with storage_lib.SweepLock(sweep_dir) as lock:
    storage = storage_lib.open_storage(f.storage, sweep_dir)
    study = storage_lib.open_study(storage, f.study, space, config, _pruner(f))
    me = storage_lib.owner(sweep_dir)
    requeued = storage_lib.requeue_own_trials(storage, study, me, claim_ownerless=not f.storage,
                                              stale_s=f.stale_after if f.storage else None)
    if requeued:
      print(f"trial(s) {', '.join(map(str, requeued))} were left running by a stopped sweep: they resume "
            "from their last checkpoint", flush=True)
    print(f"study {f.study!r}: {f.trials} trials, {f.workers} worker(s), in {sweep_dir}", flush=True)
    trials = study.get_trials(deepcopy=False)
    done = (sum(storage_lib.counted(t) for t in trials) >= f.trials
            and not any(t.state == TrialState.WAITING for t in trials))
    code, lines = (0, []) if done else _wait(_start_workers(f.workers, lock.fd, sweep_dir), study, sweep_dir)
    text, files = results.write(study, space, config, sweep_dir)
  print(text)
  print("\n".join(files), flush=True)
  if code == errors.EXIT_INTERRUPTED:
    lines = lines or ["interrupted: rerun the same command to continue the sweep"]
  return code, lines


def _work(f: Any, config: Any, space: Any, sweep_dir: Path) -> tuple[int, list[str]]:
  """Worker mode: take and train trials until the sweep's budget is used up."""
  import optuna  # pylint: disable=g-import-not-at-top
  from jaxft.sweep import storage as storage_lib  # pylint: disable=g-import-not-at-top
  from jaxft.sweep import worker  # pylint: disable=g-import-not-at-top
  storage = storage_lib.open_storage(f.storage, sweep_dir)
  study = optuna.load_study(study_name=f.study, storage=storage, pruner=_pruner(f))
  # Heartbeats only for a shared (RDB) study: a journal file in the sweep dir has no other user.
  heartbeat_s = f.stale_after / HEARTBEATS_PER_STALE if f.storage else None
  return worker.work(study, space, config, sweep_dir, f.trials, storage_lib.owner(sweep_dir), heartbeat_s)


def main(argv: list[str]) -> None:
  """CLI entry point (module docstring); every failure is one line per problem and an exit code."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI prints each trial itself
  f = flags.FLAGS
  try:
    config, space, sweep_dir = _inputs(f)
    run_mode = _coordinate if f.worker is None else _work
    code, lines = run_mode(f, config, space, sweep_dir)
  except TrainError as e:
    code, lines = e.exit_code, str(e).strip().splitlines()
  except KeyboardInterrupt:  # before the workers started (then the coordinator handles signals itself)
    code, lines = errors.EXIT_SIGINT, ["interrupted: rerun the same command to continue the sweep"]
  except Exception as e:  # pylint: disable=broad-except  # one line, the train CLI's wording
    if f.debug:
      raise
    code, lines = train_cli.describe(e, Path(f.workdir or "."))
  if code:
    _fail(lines, code)


def run() -> None:
  """The process entry point. A worker enables the CPU backend first (it may re-exec the process under
  tcmalloc, before any JAX computation); the coordinator runs no JAX."""
  if any(a.startswith("--worker=") for a in sys.argv):
    cpu.enable(relaunch=True)
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main, flags_parser=train_cli.parse_flags)
