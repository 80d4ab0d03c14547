"""A sweep's outputs: the results table (printed and ``results.csv``), Optuna's optimisation-history and
parameter-importance plots (PNG), and the best trial's config as ``best_config.json``, runnable with
``python -m jaxft.train --config configs/from_json.py:<sweep dir>/best_config.json``.

Nothing here changes the study.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import optuna
from optuna.trial import TrialState

from jaxft.sweep import space as space_lib
from jaxft.sweep import storage as storage_lib
from jaxft.sweep.worker import trial_dir

CSV_FILE, BEST_CONFIG_FILE = "results.csv", "best_config.json"
HISTORY_PNG, IMPORTANCE_PNG = "optimization_history.png", "param_importances.png"


def best_top1(t: optuna.trial.FrozenTrial) -> float | None:
  """The best validation top-1 a trial reported (None before its first evaluation)."""
  return max(t.intermediate_values.values()) if t.intermediate_values else None


def rows(study: optuna.Study, keys: list[str]) -> list[dict[str, Any]]:
  """One row per trial, by number: ``trial``, ``state`` (``FAIL (diverged)`` for a non-finite loss),
  ``best_top1``, each of ``keys`` (the space's), ``workdir`` and ``error``."""
  out = []
  for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
    state = t.state.name + (" (diverged)" if t.user_attrs.get(storage_lib.DIVERGED_ATTR) else "")
    top1 = best_top1(t)
    out.append({"trial": t.number, "state": state, "best_top1": "" if top1 is None else f"{top1:.4f}",
                **{k: t.params.get(k, "") for k in keys},
                "error": t.user_attrs.get(storage_lib.ERROR_ATTR, "")})
  return out


def table(rs: list[dict[str, Any]]) -> str:
  """``rs`` as an aligned text table (the ``error`` column only when some trial has one)."""
  if not rs:
    return "(no trials)"
  cols = [c for c in rs[0] if c != "error" or any(r["error"] for r in rs)]
  cells = [[_cell(r[c]) for c in cols] for r in rs]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def _cell(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(fn: Any, study: optuna.Study, path: Path) -> bool:
  """Saves Optuna's matplotlib plot ``fn(study)`` to ``path``; False (logged) when it cannot be drawn
  (e.g. importances with fewer than two complete trials)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only; the sweep may run without a display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      ax = fn(study)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)
    plt.close(ax.figure)
    return True
  except Exception as e:  # pylint: disable=broad-except  # a plot is a convenience, never the result
    logging.info("%s not drawn: %s", path.name, e)
    return False


def write(study: optuna.Study, space: space_lib.Space, base: ml_collections.ConfigDict,
          sweep_dir: Path) -> tuple[str, list[str]]:
  """Writes the results CSV, the plots and the best trial's config into ``sweep_dir``.

  Returns:
    The printed table and one line per file written (the best config with the command that runs it).
  """
  keys = sorted(space)
  rs = rows(study, keys)
  with open(sweep_dir / CSV_FILE, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["trial", "state", "best_top1", *keys, "error"])
    writer.writeheader()
    writer.writerows(rs)
  lines = [f"results: {sweep_dir / CSV_FILE}"]
  from optuna.visualization import matplotlib as vis  # pylint: disable=g-import-not-at-top
  for fn, name in ((vis.plot_optimization_history, HISTORY_PNG), (vis.plot_param_importances, IMPORTANCE_PNG)):
    if _plot(fn, study, sweep_dir / name):
      lines.append(f"plot: {sweep_dir / name}")
  done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
  if done:
    best = max(done, key=lambda t: (t.value, -t.number))
    path = sweep_dir / BEST_CONFIG_FILE
    path.write_text(space_lib.with_params(base, best.params).to_json(indent=2) + "\n", encoding="utf-8")
    lines.append(f"best: trial {best.number}, val top-1 {best.value:.4f} (checkpoints in "
                 f"{trial_dir(sweep_dir, best.number)}); its config: {path}, run it with "
                 f"python -m jaxft.train --config configs/from_json.py:{path}")
  return table(rs), lines
