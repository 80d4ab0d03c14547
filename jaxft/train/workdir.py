"""A workdir belongs to one config: written on the first run, compared on every rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from jaxft.train.errors import TrainError

CONFIG_FILE = "config.json"
# Keys that may differ between a workdir's first run and a rerun without counting as "a different
# config": they change how long or how verbosely a run goes, not what it computes.
RESUMABLE_KEYS = ("train.num_steps", "train.epochs", "train.allow_config_change", "train.progress",
                  "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "data.cache_dir", "distributed")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}.{k}" if prefix else k
    out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
  return out


def check_workdir_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` on the first run; refuses a rerun with a different config.

  Raises:
    TrainError: listing the differing keys, unless ``config.train.allow_config_change``.
  """
  path = workdir / CONFIG_FILE
  new = _flat(json.loads(config.to_json()))
  if path.exists():
    old = _flat(json.loads(ml_collections.ConfigDict(json.loads(path.read_text())).to_json()))
    diff = sorted(k for k in set(old) | set(new)
                  if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
    if diff and not config.train.allow_config_change:
      details = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in diff[:8])
      raise TrainError(
          f"workdir {workdir} was written by a different config ({details}). Use a new --workdir, "
          "or pass --config.train.allow_config_change=True to resume it anyway.")
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(config.to_json(indent=2))
  os.replace(tmp, path)
