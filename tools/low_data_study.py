"""The low-data transfer study: regularisers × training images per class × seeds, one table.

    mkdir -p data && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C data
    python tools/low_data_study.py --workdir runs/low_data_study
    python tools/low_data_study.py --workdir /tmp/quick --methods none,l2sp --per-class 10 --seeds 0

Every run is ``jaxft.train.train_and_evaluate`` of ``--config`` (default ``configs/low_data.py``: real
ImageNet EfficientNet-Lite0 on real CIFAR-10 JPEGs) with the method's overrides (:data:`METHODS`),
``data.per_class = N`` and ``seed = data.split_seed = S``: the seed picks the N training images per
class as well as the initialisation and batch order, so the spread over seeds includes which images
were drawn. Validation is ``data.val_fraction`` (10%) of the rest of the train split. Every method runs
the same number of steps (``train.num_steps``, or ``--steps``).

Each run has its own workdir, ``WORKDIR/<method>/n<N>/seed<S>``. A run that finished (its
``study_run.json`` exists and records the very config it would run now) is skipped on a
rerun, so an interrupted study resumes where it stopped; an unfinished one resumes from its checkpoint.
All runs share one process (the JAX start-up, the oneDNN load and the decoded dataset's cache read are
paid once) and one persistent XLA compilation cache in ``WORKDIR/xla_cache``: runs whose compiled steps
are the same programs (the three sizes of one method and seed; every run's eval step) compile once.

Writes ``WORKDIR/results.csv`` and ``results.json`` (one row per run: held-out top-1/top-5, images,
wall and CPU time) and ``WORKDIR/table.md`` (held-out top-1, mean ± sample standard deviation over the seeds,
one row per method, one column per size), and prints the table. Bad input (an unknown method, a config
key this jaxft lacks, an invalid value, missing data) is one ``error:`` line and exit code 2, before any
run starts.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jaxft and configs/

# Each method is config overrides of the base config, ``{dotted key: value}``, all at the same budget.
# "none" turns every regulariser off; each other method turns one on. The strengths are fixed
# beforehand (no tuning on the held-out set): see configs/low_data.py for the L2-SP scale; DELTA's 0.01
# and BSS's 0.001 are their papers' defaults.
METHODS: dict[str, dict[str, Any]] = {
    "none": {"optim.l2sp.alpha": 0.0, "optim.weight_decay": 0.0, "loss.delta": 0.0},
    "l2sp": {"optim.l2sp.alpha": 10.0, "optim.weight_decay": 0.0, "loss.delta": 0.0},
    # jaxft averages DELTA's squared feature distance over positions (the paper sums it), hence a larger
    # weight than the paper's 0.01; the channel attention is measured on 2 batches (50 images: each one
    # costs a pass of the rest of the net per channel).
    "delta": {"optim.l2sp.alpha": 0.0, "optim.weight_decay": 0.0, "loss.delta": 0.1,
              "loss.delta_batches": 2},
    "bss": {"optim.l2sp.alpha": 0.0, "optim.weight_decay": 0.0, "loss.delta": 0.0, "loss.bss": 0.001},
    # The controller moves alpha at each evaluation (val vs train loss), so this method evaluates every
    # 25 steps (3 more passes over the held-out set than the others; the same training steps).
    "adaptive": {"optim.l2sp.alpha": "adaptive(0.1,100,0.1)", "optim.weight_decay": 0.0, "loss.delta": 0.0,
                 "train.eval_every": 25},
}
DEFAULT_CONFIG = ROOT / "configs" / "low_data.py"
DEFAULT_SIZES = (10, 50, 100)
DEFAULT_SEEDS = (0, 1, 2)
RUN_FILE = "study_run.json"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 75  # as python -m jaxft.train: stopped by a signal after a checkpoint


class StudyError(Exception):
  """A problem with the study's arguments the user can fix; one line."""


class Interrupted(Exception):
  """A signal stopped a run after it saved a checkpoint (rerun the same command to resume it)."""


def _ints(text: str, what: str) -> tuple[int, ...]:
  try:
    values = tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise StudyError(f"--{what} must be comma-separated integers, got {text!r}") from None
  if not values or min(values) < 0:
    raise StudyError(f"--{what} must list non-negative integers, got {text!r}")
  return values


def _methods(text: str) -> tuple[str, ...]:
  names = tuple(t.strip() for t in text.split(",") if t.strip())
  unknown = [n for n in names if n not in METHODS]
  if unknown or not names:
    raise StudyError(f"unknown method(s) {', '.join(unknown) or repr(text)}; known: {', '.join(METHODS)}")
  return names


def load_config(path: Path) -> Any:
  """``get_config()`` of the config file ``path`` (a configs/*.py file; it is Python, as for the CLI)."""
  if not path.is_file():
    raise StudyError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(f"_study_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def set_key(config: Any, key: str, value: Any, why: str) -> None:
  """``config.<key> = value`` for a dotted ``key``; a key the schema lacks or a value of the wrong type
  is a :class:`StudyError` naming ``why`` (the method or flag that asked for it)."""
  node = config
  *parents, last = key.split(".")
  for i, p in enumerate(parents + [last]):
    if p not in node:
      raise StudyError(f"{why} sets config.{key}, but this jaxft's config has no "
                       f"{'.'.join((parents + [last])[:i + 1])} (is the feature merged?)")
    if i < len(parents):
      node = node[p]
  try:
    node[last] = value
  except (TypeError, ValueError) as e:
    raise StudyError(f"{why} sets config.{key} = {value!r}, which it refuses: {e}") from None


def run_config(base: Any, method: str, per_class: int, seed: int, steps: int, data: str) -> Any:
  """A new config: ``base`` (not mutated) with ``method``'s overrides, the size, the seed, the steps."""
  config = copy.deepcopy(base)  # keeps the adaptive-capable fields (resolving types them as float)
  for key, value in METHODS[method].items():
    set_key(config, key, value, f"method {method!r}")
  set_key(config, "data.per_class", per_class, "--per-class")
  set_key(config, "seed", seed, "--seeds")
  set_key(config, "data.split_seed", seed, "--seeds")
  if steps:
    set_key(config, "train.num_steps", steps, "--steps")
  if data:
    set_key(config, "data.source", data, "--data")
  return config


def plan(args: argparse.Namespace) -> list[tuple[str, int, int, Any]]:
  """``[(method, per_class, seed, config)]`` of every run, each config checked before any run starts.

  Raises:
    StudyError: a bad flag, an unknown method or config key, or a config that fails validation.
  """
  from jaxft import validate  # pylint: disable=g-import-not-at-top
  methods, sizes = _methods(args.methods), _ints(args.per_class, "per-class")
  seeds = _ints(args.seeds, "seeds")
  if 0 in sizes:
    raise StudyError("--per-class must be positive (0 would mean all images, not a low-data run)")
  base = load_config(Path(args.config))
  runs = [(m, n, s, run_config(base, m, n, s, args.steps, args.data))
          for m in methods for n in sizes for s in seeds]
  for m, n, s, config in runs:
    problems = validate.validate(config)
    if problems:
      raise StudyError(f"{m}/n{n}/seed{s}: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
  return runs


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def _finished(run_dir: Path, config: Any) -> dict[str, Any] | None:
  """The recorded row of a finished run in ``run_dir``, or None when it has not finished.

  Raises:
    StudyError: the finished run had another config (any key, the step budget included): its result
      is not this study's.
  """
  record = run_dir / RUN_FILE
  if not record.exists():
    return None
  row = json.loads(record.read_text())
  old, new = _flat(row.pop("config", {})), _flat(json.loads(config.to_json()))
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diff:
    details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
    raise StudyError(f"{run_dir} holds a finished run of another config ({details}); use a new "
                     "--workdir or delete that run")
  return row


def run_one(workdir: Path, method: str, per_class: int, seed: int, config: Any) -> dict[str, Any]:
  """Trains and evaluates one run (or reads its record when it finished before). Returns its row."""
  from jaxft.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  run_dir = workdir / method / f"n{per_class}" / f"seed{seed}"
  done = _finished(run_dir, config)
  if done is not None:
    return dict(done, skipped=True)
  start, cpu_start = time.perf_counter(), time.process_time()
  result = train_and_evaluate(config, run_dir)
  if result.get("interrupted"):
    raise Interrupted(run_dir)
  row = {"method": method, "per_class": per_class, "seed": seed, "top1": float(result["top1"]),
         "top5": float(result["top5"]), "n_val": int(result["n"]), "steps": int(result["step"]),
         "wall_s": round(time.perf_counter() - start, 2),
         # CPU seconds of this process (all threads): unlike wall time, not stretched by other load.
         "cpu_s": round(time.process_time() - cpu_start, 2)}
  config_json = json.loads(config.to_json())
  (run_dir / RUN_FILE).write_text(json.dumps(dict(row, config=config_json), indent=2))
  return dict(row, skipped=False)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, float, int]]:
  """``{(method, per_class): (mean top-1, sample std (0 for one seed), seeds)}``."""
  groups: dict[tuple[str, int], list[float]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["per_class"]), []).append(r["top1"])
  return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
          for k, v in groups.items()}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The table: held-out top-1 (%) mean ± std over seeds, methods × images per class."""
  summary = summarize(rows)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  sizes = sorted({r["per_class"] for r in rows})
  seeds = sorted({r["seed"] for r in rows})
  lines = ["| method | " + " | ".join(f"{n} / class" for n in sizes) + " |",
           "|---|" + "---|" * len(sizes)]
  for m in methods:
    cells = []
    for n in sizes:
      mean, std, k = summary.get((m, n), (float("nan"), float("nan"), 0))
      cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if k == len(seeds) else f" ({k} seeds)"))
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + (f"\n\nHeld-out top-1 (%), mean ± sample std over seeds "
                             f"{', '.join(map(str, seeds))}.\n")


def write_results(workdir: Path, rows: Sequence[dict[str, Any]]) -> str:
  """Writes results.csv, results.json and table.md into ``workdir``; returns the table."""
  fields = ["method", "per_class", "seed", "top1", "top5", "n_val", "steps", "wall_s", "cpu_s", "skipped"]
  with open(workdir / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  summary = [{"method": m, "per_class": n, "top1_mean": mean, "top1_std": std, "seeds": k}
             for (m, n), (mean, std, k) in summarize(rows).items()]
  (workdir / "results.json").write_text(json.dumps({"runs": list(rows), "summary": summary}, indent=2))
  table = markdown_table(rows)
  (workdir / "table.md").write_text(table)
  return table


def _enable_compile_cache(workdir: Path) -> None:
  """One persistent XLA cache for the study: identical programs (same method and seed at another size,
  every eval step) compile once; a rerun compiles nothing it compiled before."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="where every run's workdir and the results go")
  p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the base config file")
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
  p.add_argument("--per-class", default=",".join(map(str, DEFAULT_SIZES)), help="training images per class")
  p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="seeds (init, order, images)")
  p.add_argument("--steps", type=int, default=0, help="train.num_steps of every run; 0 = the config's")
  p.add_argument("--data", default="", help="data.source of every run, e.g. folder:PATH; '' = the config's")
  p.add_argument("--no-compile-cache", action="store_true", help="no persistent XLA compilation cache")
  p.add_argument("--verbose", action="store_true", help="show each run's training log (INFO)")
  return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  """Runs the study; returns the exit code (0 done, 2 bad input, 75 or 130 interrupted)."""
  from jaxft import cpu  # pylint: disable=g-import-not-at-top
  from jaxft.data import DataError  # pylint: disable=g-import-not-at-top
  from jaxft.train.errors import TrainError  # pylint: disable=g-import-not-at-top
  args = parse_args(argv)
  if args.verbose:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  workdir = Path(args.workdir).absolute()
  try:
    runs = plan(args)
    cpu.enable()  # as python -m jaxft.train does, before JAX starts
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.no_compile_cache:
      _enable_compile_cache(workdir)
    rows = []
    for i, (m, n, s, config) in enumerate(runs):
      row = run_one(workdir, m, n, s, config)
      rows.append(row)
      took = "done before" if row["skipped"] else f"{row['wall_s']:.0f} s"
      print(f"[{i + 1}/{len(runs)}] {m} n{n} seed{s}: top1 {100 * row['top1']:.2f}% ({took})", flush=True)
  except (StudyError, TrainError, DataError) as e:
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except Interrupted as e:
    print(f"error: interrupted in {e}; rerun the same command to resume (finished runs are kept)",
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except KeyboardInterrupt:
    print("error: interrupted before a checkpoint; rerun the same command (finished runs are kept)",
          file=sys.stderr)
    return 130
  print(write_results(workdir, rows))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
