"""Wall time of a short training CLI run, this checkout against another one, interleaved in one run.

    git worktree add /tmp/jaxft-base <commit>      # the reference: any other checkout of jaxft
    python tools/bench_startup.py --baseline /tmp/jaxft-base --runs 5

Each round runs ``python -m jaxft.train --config configs/tiny.py`` (CIFAR ResNet-8, random init) for
``--steps`` steps on a 24-image folder this script writes, once from each checkout, alternating, so that
load from other users of the machine hits both alike. The number is the whole process, start to exit:
interpreter start, the tcmalloc relaunch, imports, data, compilation, the steps, the final checkpoint
and plots — what every CLI start costs a user (and every CLI test). Each run imports its own
checkout's jaxft (it runs with that checkout as its working directory, which comes first on
``sys.path``). Prints the median of each and the ratio baseline / this checkout (> 1: this one starts
faster). The results of a run are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line (``argv`` without the program name)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--baseline", required=True, help="another jaxft checkout (the reference)")
  p.add_argument("--runs", type=int, default=5, help="runs per checkout (default 5)")
  p.add_argument("--steps", type=int, default=4, help="training steps per run (default 4)")
  args = p.parse_args(argv)
  if not (Path(args.baseline) / "jaxft" / "train" / "__main__.py").is_file():
    p.error(f"--baseline {args.baseline} is not a jaxft checkout (no jaxft/train/__main__.py)")
  if args.runs < 1 or args.steps < 1:
    p.error("--runs and --steps must be >= 1")
  return args


def write_folder(root: Path, per_class: int = 12) -> Path:
  """Writes two classes of ``per_class`` noisy 32x32 PNGs under ``root`` and returns it."""
  rs = np.random.RandomState(1)
  for name, colour in (("blue", (20, 40, 200)), ("red", (200, 30, 20))):
    noisy = np.clip(np.array(colour) + rs.randint(-40, 40, (per_class, 32, 32, 3)), 0, 255)
    (root / name).mkdir(parents=True)
    for i, img in enumerate(noisy.astype(np.uint8)):
      Image.fromarray(img).save(root / name / f"{i:03d}.png")
  return root


def timed_run(checkout: Path, folder: Path, workdir: Path, steps: int) -> float:
  """Seconds from start to exit of one training CLI run from ``checkout``; raises if it fails."""
  cmd = [sys.executable, "-m", "jaxft.train", "--config", "configs/tiny.py",
         f"--config.data.source=folder:{folder}", f"--config.data.cache_dir={workdir}-cache",
         f"--config.train.num_steps={steps}", "--config.train.eval_every=0", "--workdir", str(workdir)]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAXFT_TCMALLOC_RELAUNCHED")}
  start = time.perf_counter()
  r = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if r.returncode:
    raise SystemExit(f"error: the run from {checkout} failed ({r.returncode}): {r.stderr[-2000:]}")
  return seconds


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  checkouts = {"this checkout": HERE, "baseline": Path(args.baseline).resolve()}
  times: dict[str, list[float]] = {name: [] for name in checkouts}
  with tempfile.TemporaryDirectory() as tmp:
    folder = write_folder(Path(tmp) / "data")
    for i in range(args.runs):
      for name, checkout in checkouts.items():
        times[name].append(timed_run(checkout, folder, Path(tmp) / f"{name}-{i}".replace(" ", "_"),
                                     args.steps))
  for name, ts in times.items():
    print(f"{name:14s} median {statistics.median(ts):6.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
  ratio = statistics.median(times["baseline"]) / statistics.median(times["this checkout"])
  print(f"baseline / this checkout: {ratio:.2f}x")


if __name__ == "__main__":
  main(sys.argv[1:])
