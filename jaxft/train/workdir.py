"""A workdir belongs to one run at a time, one config and one dataset.

* **One writer**: :class:`WorkdirLock` holds an exclusive ``flock`` on ``WORKDIR/.lock`` for the whole
  run; a second process stops at once naming the holder. The kernel drops the lock when its process
  dies, so a crash or ``kill -9`` never leaves a stale lock.
* **One config**: ``config.json`` is written once the run has really started (data and model loaded,
  just before step 1 or the resume), and never rewritten while the workdir has checkpoints; a rerun with
  a different config is refused unless ``train.allow_config_change``.
* **One dataset**: ``data.json`` records what the run trained on (count, classes, a content hash of the
  decoded images and labels of each split); resuming on different data is refused unless
  ``train.allow_data_change``. Allowed changes are appended to ``changes.jsonl``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxft import config as config_lib
from jaxft import data as data_lib
from jaxft.train.errors import EXIT_BAD_INPUT, EXIT_WORKDIR_BUSY, TrainError

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
CHANGES_FILE = "changes.jsonl"
LOCK_FILE = ".lock"
# Keys that may differ between a workdir's first run and a rerun without counting as "a different
# config": they change how long or how verbosely a run goes, not what it computes.
RESUMABLE_KEYS = ("train.num_steps", "train.epochs", "train.allow_config_change",
                  "train.allow_data_change", "train.progress", "train.log_every", "train.eval_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "data.cache_dir", "distributed")


class WorkdirLock:
  """``with WorkdirLock(workdir):`` — this process is the only run in ``workdir`` until the block ends.

  Raises (on entry):
    TrainError: another process holds the workdir (exit code 5), naming its pid and host.
  """

  def __init__(self, workdir: Path, enabled: bool = True):
    self.path = workdir / LOCK_FILE
    self.enabled = enabled
    self._file: Any = None

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live process (a dead one's lock went with it)
      f.seek(0)
      holder = f.read().strip()
      f.close()
      raise TrainError(
          f"workdir {self.path.parent} is in use by {holder or 'another process'}; one run per workdir. "
          "Wait for that run to end (or stop it), or use another --workdir.",
          exit_code=EXIT_WORKDIR_BUSY) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} "
            f"(since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}.{k}" if prefix else k
    out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
  return out


def check_workdir_config(workdir: Path, config: ml_collections.ConfigDict,
                         resuming: bool) -> dict[str, list[Any]]:
  """Compares ``config`` with the ``config.json`` of a workdir that has checkpoints (``resuming``);
  writes nothing (see :func:`record_start`).

  Returns:
    The differing keys ``{key: [old, new]}`` that ``train.allow_config_change`` allows (else empty).

  Raises:
    TrainError: listing the differing keys, unless ``config.train.allow_config_change`` (exit code 2).
  """
  path = workdir / CONFIG_FILE
  if not resuming or not path.exists():
    return {}
  new = _flat(json.loads(config.to_json()))
  old = _flat(json.loads(ml_collections.ConfigDict(json.loads(path.read_text())).to_json()))
  # A field added to the schema after the workdir was written ran at its default there (new features
  # default to off), so a run that keeps the default is no change.
  defaults = _flat(json.loads(config_lib.default_config().to_json()))
  old.update({k: defaults[k] for k in new.keys() - old.keys() if k in defaults})
  diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
  if diff and not config.train.allow_config_change:
    details = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in diff[:8])
    raise TrainError(
        f"workdir {workdir} was written by a different config ({details}). Use a new --workdir, "
        "or pass --config.train.allow_config_change=True to resume it anyway.", exit_code=EXIT_BAD_INPUT)
  return {k: [old.get(k), new.get(k)] for k in diff}


def _fingerprint(ds: data_lib.Dataset) -> dict[str, Any]:
  if not isinstance(ds, data_lib.Dataset):  # a stream source (jaxft.data.stream) says what it is
    return ds.fingerprint()
  h = hashlib.sha256()
  for a in (ds.images, ds.labels):
    h.update(np.ascontiguousarray(a).data)
  return {"n": len(ds), "class_names": list(ds.class_names), "image_shape": list(ds.images.shape[1:]),
          "sha256": h.hexdigest()}


def data_identity(train_ds: data_lib.Dataset, val_ds: data_lib.Dataset | None) -> dict[str, Any]:
  """What ``data.json`` records of the data a run trains on: per split the image count, the class
  names, the image shape and the sha256 of the decoded images and labels."""
  return {"train": _fingerprint(train_ds), "val": None if val_ds is None else _fingerprint(val_ds)}


def _data_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  out = []
  for split in ("train", "val"):
    a, b = old.get(split), new.get(split)
    if a == b:
      continue
    if a is None or b is None:
      out.append(f"{split}: {'none' if a is None else a['n']} → {'none' if b is None else b['n']} images")
    elif a["n"] != b["n"] or a["class_names"] != b["class_names"]:
      out.append(f"{split}: {a['n']} images of {a['class_names']} → {b['n']} of {b['class_names']}")
    else:
      out.append(f"{split}: the same {a['n']} images counted, different content")
  return out


def check_workdir_data(workdir: Path, config: ml_collections.ConfigDict, identity: dict[str, Any],
                       resuming: bool) -> list[str]:
  """Compares ``identity`` (:func:`data_identity`) with the ``data.json`` of a workdir that has
  checkpoints (``resuming``); writes nothing.

  Returns:
    What changed, when ``config.train.allow_data_change`` allows it (else empty).

  Raises:
    TrainError: the data differ and ``train.allow_data_change`` is off (exit code 2).
  """
  path = workdir / DATA_FILE
  if not resuming or not path.exists():
    return []
  diff = _data_diff(json.loads(path.read_text()), identity)
  if diff and not config.train.allow_data_change:
    raise TrainError(
        f"the data changed since workdir {workdir} was trained on it ({'; '.join(diff)}): resuming "
        "would train on a different dataset. Use a new --workdir, restore the data, or pass "
        "--config.train.allow_data_change=True to resume it anyway.", exit_code=EXIT_BAD_INPUT)
  return diff


def _write_json(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def record_start(workdir: Path, config: ml_collections.ConfigDict, identity: dict[str, Any],
                 step: int, config_changes: dict[str, list[Any]], data_changes: list[str]) -> None:
  """Called when a run really starts (at ``step``: 0, or the step it resumes). A fresh workdir gets its
  ``config.json`` and ``data.json``; a resumed one keeps them, and the changes its checks allowed are
  appended to ``changes.jsonl``. Nothing is read from ``config`` but its JSON."""
  if step == 0 or not (workdir / CONFIG_FILE).exists():
    _write_json(workdir / CONFIG_FILE, config.to_json(indent=2))
  if step == 0 or not (workdir / DATA_FILE).exists():
    _write_json(workdir / DATA_FILE, json.dumps(identity, indent=2))
  if config_changes or data_changes:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "config": config_changes,
              "data": data_changes}
    with open(workdir / CHANGES_FILE, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, default=str) + "\n")
