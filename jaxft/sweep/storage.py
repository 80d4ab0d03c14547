"""Where a study lives, opening it safely, and what a rerun does with the trials a killed sweep left.

* **Storage.** No ``--storage``: Optuna's journal file ``<sweep dir>/study.journal`` — the backend Optuna
  documents for several processes on one machine (SQLite's locking is not). Its writes are serialised
  by :class:`FlockLock`, a kernel ``flock`` (Optuna's own file locks are lock *files*, made for NFS: a
  ``kill -9`` leaves one behind and every later writer waits out its grace period). Any RDB URL
  (``postgresql://…``, ``mysql://…``, ``sqlite:///…``) goes to Optuna's ``RDBStorage``: one PostgreSQL
  or MySQL study can be shared by sweeps on several machines.
* **The study** records the space and the base config it searches (user attributes); a rerun with a
  different space or config is refused before anything is written.
* **A killed sweep.** Each trial records its owner (host and sweep dir). A rerun in the same sweep dir
  (which one process group holds at a time, :class:`SweepLock`) puts the trials its owner left RUNNING
  back in the queue (WAITING) under the same number and parameters; the worker that takes one resumes
  its workdir from the last checkpoint. Trials of other owners are theirs to resume — unless, on a
  shared RDB study, their heartbeat is older than ``--stale_after``: then their machine is taken for dead
  and any sweep requeues them. (Optuna's own heartbeats fail a stale trial and retry it under a new
  number; requeueing keeps the number, so a trial's workdir and checkpoints stay its own.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import ml_collections
import optuna
from optuna.storages import journal
from optuna.trial import TrialState

from jaxft.sweep import space as space_lib
from jaxft.train.errors import EXIT_BAD_INPUT, EXIT_WORKDIR_BUSY, TrainError

JOURNAL_FILE = "study.journal"
OWNER_ATTR = "jaxft_owner"  # trial user attribute: host:sweep dir of the sweep that runs it
DIVERGED_ATTR = "jaxft_diverged"  # trial user attribute: it failed by a non-finite loss (counts as done)
ERROR_ATTR = "jaxft_error"  # trial user attribute: why it failed
HEARTBEAT_ATTR = "jaxft_heartbeat"  # trial user attribute: epoch seconds its worker last said it was alive
SPACE_ATTR, CONFIG_ATTR = "jaxft_space", "jaxft_config"  # study user attributes


class FlockLock:
  """Optuna's journal lock as a kernel ``flock`` on ``path``: released by the kernel when its holder dies,
  so a killed worker never blocks the others. (The backend only calls ``acquire`` and ``release``; its
  lock base class is not public, hence no base class here.)"""

  def __init__(self, path: str | Path):
    self.path = str(path)
    self._fd: int | None = None

  def acquire(self) -> bool:
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(self._fd, fcntl.LOCK_EX)
    return True

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing releases the flock
      self._fd = None


class SweepLock:
  """``with SweepLock(dir):`` — the only sweep (and its workers) in ``dir``. The lock's file descriptor
  is inherited by the workers (:attr:`fd`), so a worker that outlived its sweep still holds it.

  Raises (on entry, after waiting up to ``wait_s`` for workers of a killed sweep to go):
    TrainError: another sweep runs in ``dir`` (exit code 5).
  """

  def __init__(self, sweep_dir: Path, wait_s: float = 10.0):
    self.path, self.wait_s, self.fd = sweep_dir / "sweep.lock", wait_s, -1

  def __enter__(self) -> "SweepLock":
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.time() + self.wait_s
    while True:
      try:
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self
      except OSError:
        if time.time() > deadline:
          os.close(self.fd)
          raise TrainError(f"sweep dir {self.path.parent} is in use by another sweep (or its workers); "
                           "wait for it to end, or use another --workdir", exit_code=EXIT_WORKDIR_BUSY) from None
        time.sleep(0.2)

  def __exit__(self, *exc: Any) -> None:
    os.close(self.fd)


def owner(sweep_dir: Path) -> str:
  """The owner tag of the trials a sweep in ``sweep_dir`` runs: ``host:absolute dir``."""
  return f"{socket.gethostname()}:{sweep_dir.absolute()}"


def _shown_url(url: str) -> str:
  """``url`` without its password (for messages)."""
  try:
    import sqlalchemy  # pylint: disable=g-import-not-at-top
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except  # an unparsable URL is shown as given
    return url


def open_storage(url: str | None, sweep_dir: Path) -> optuna.storages.BaseStorage:
  """The study storage: ``url`` (an Optuna RDB URL) or, when None/empty, the journal file in ``sweep_dir``.

  Raises:
    TrainError: the URL is malformed, its driver is not installed, or its server cannot be reached
      (exit code 2; nothing is written).
  """
  if not url:
    path = sweep_dir / JOURNAL_FILE
    return journal.JournalStorage(journal.JournalFileBackend(str(path), lock_obj=FlockLock(f"{path}.lock")))
  if "://" not in url:
    raise TrainError(f"--storage {url}: not a database URL; give an Optuna RDB URL such as "
                     "postgresql://user:password@host/db or sqlite:///sweep.db, or leave it out for a "
                     "journal file in the sweep dir")
  try:
    return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
  except Exception as e:  # pylint: disable=broad-except  # sqlalchemy/driver errors of many types
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()
    raise TrainError(f"--storage {_shown_url(url)}: cannot open the study storage "
                     f"({type(e).__name__}: {reason[0] if reason else '?'}); check the URL, that the "
                     "server runs and accepts connections, and that its driver is installed "
                     "(pip install 'jaxft[sweep]')") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
  """A short connection timeout for network databases, so a wrong host fails in seconds, not minutes."""
  if url.startswith(("postgresql", "mysql")):
    return {"connect_args": {"connect_timeout": 10}}
  return {}


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out: dict[str, Any] = {}

  def walk(d: Mapping[str, Any], prefix: str) -> None:
    for k, v in d.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}.")
      else:
        out[prefix + k] = v
  walk(json.loads(config.to_json()), "")
  return out


def open_study(storage: optuna.storages.BaseStorage, name: str, space: space_lib.Space,
               base: ml_collections.ConfigDict, pruner: optuna.pruners.BasePruner) -> optuna.Study:
  """Creates study ``name`` (maximising validation top-1) recording ``space`` and ``base``, or loads it.

  Raises:
    TrainError: the existing study was created with a different space or base config (nothing is
      written; exit code 2).
  """
  try:  # loaded first: creating an existing study would still append a record to a journal
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
  except KeyError:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                load_if_exists=True, pruner=pruner)
  if study.direction != optuna.study.StudyDirection.MAXIMIZE:
    raise TrainError(f"study {name!r} already exists and minimises; a jaxft sweep maximises validation "
                     "top-1: use another --study")
  attrs = study.user_attrs
  if SPACE_ATTR in attrs:
    diff = space_lib.space_diff(attrs[SPACE_ATTR], space)
    if diff:
      raise TrainError(f"study {name!r} already exists with a different space ({'; '.join(diff)}): use "
                       "another --study, or the space it was created with", exit_code=EXIT_BAD_INPUT)
    old, new = attrs.get(CONFIG_ATTR, {}), _flat_config(base)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in space)
    if changed:
      raise TrainError(f"study {name!r} already exists with a different base config (changed: "
                       f"{', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}): use another --study, "
                       "or the config and overrides it was created with", exit_code=EXIT_BAD_INPUT)
  else:
    study.set_user_attr(CONFIG_ATTR, _flat_config(base))
    study.set_user_attr(SPACE_ATTR, space_lib.space_json(space))  # last: its presence marks a set-up study
  return study


def last_beat(trial: optuna.trial.FrozenTrial) -> float:
  """When a running trial's worker last said it was alive (its heartbeat, else its start), epoch seconds."""
  beat = trial.user_attrs.get(HEARTBEAT_ATTR)
  if beat is not None:
    return float(beat)
  return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


def requeue_own_trials(storage: optuna.storages.BaseStorage, study: optuna.Study, me: str,
                       claim_ownerless: bool, stale_s: float | None = None) -> list[int]:
  """Puts back in the queue (RUNNING → WAITING, same number and parameters) the trials owned by ``me``,
  with ``claim_ownerless`` those with no owner yet (killed between creation and tagging: only safe
  when this sweep is the storage's only user, as with the default journal file), and with ``stale_s``
  those of any owner whose heartbeat (:data:`HEARTBEAT_ATTR`) is older than that (a machine sharing
  the study that died and never came back; the trial restarts from step 0 unless this sweep dir has
  its checkpoint).

  Only call while holding the sweep dir's :class:`SweepLock`: then none of ``me``'s trials is alive.

  Returns:
    The numbers of the trials requeued.
  """
  out, now = [], time.time()
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    who = t.user_attrs.get(OWNER_ATTR)
    stale = stale_s is not None and now - last_beat(t) > stale_s
    if who == me or (who is None and claim_ownerless) or stale:
      # FrozenTrial._trial_id is the storage's key for the trial; Optuna exposes no other handle.
      storage.set_trial_state_values(t._trial_id, TrialState.WAITING)  # pylint: disable=protected-access
      out.append(t.number)
  return out


def counted(trial: optuna.trial.FrozenTrial) -> bool:
  """Whether ``trial`` uses up one of the sweep's ``--trials``: done (complete, pruned, diverged) or on
  its way (running, waiting). A trial failed by an error the user can fix is replaced on rerun."""
  if trial.state == TrialState.FAIL:
    return bool(trial.user_attrs.get(DIVERGED_ATTR))
  return True
