"""Eval throughput of a model before and after ``surgery.fold_batchnorm``, in one process.

    python tools/bench_fold.py                                   # ResNet-50, 224 and 32 px
    python tools/bench_fold.py --model cifar_resnet20 --sizes 32 --batch 64 --steps 20 --json out.json

Both networks run the jitted eval forward pass (``train=False``) built with the layers the CLIs use
(``jaxft.cpu.enable()`` then ``jaxft.cpu.network_layers()``: the CPU backend on a CPU, plain layers on
GPU/TPU) on the same random batch. After compiling and one warm-up call each, the two alternate, one
call at a time, so that load from other users of the machine hits both alike; images/s is
``batch / median call time`` and the ratio is folded / unfolded. Weights are random (speed does not
depend on their values). The results of a run are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line (``argv`` without the program name)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnet50", help="zoo architecture (default resnet50)")
  p.add_argument("--sizes", type=int, nargs="+", default=[224, 32], help="image sides (default 224 32)")
  p.add_argument("--batch", type=int, default=16, help="images per call (default 16)")
  p.add_argument("--steps", type=int, default=5, help="timed calls per network and size (default 5)")
  p.add_argument("--json", default="", help="also write the records to this file")
  args = p.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or min(args.sizes) < 8:
    p.error("--batch and --steps must be >= 1 and every size >= 8")
  return args


def bench_size(models: dict[str, Any], layers: Any, size: int, batch: int, steps: int
               ) -> dict[str, Any]:
  """Times the eval forward of each model of ``models`` (name → Model) on one ``batch × size²`` batch;
  returns a record with images/s per model and the folded/unfolded ratio. Nothing is mutated."""
  import jax  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  fns, compile_s = {}, {}
  for name, m in models.items():
    net = m.module(layers=layers)
    fns[name] = jax.jit(lambda v, x, net=net: net.apply(v, x, train=False))
    t0 = time.perf_counter()
    fns[name](m.variables, x).block_until_ready()  # compile
    compile_s[name] = time.perf_counter() - t0
    fns[name](m.variables, x).block_until_ready()  # warm-up
  times: dict[str, list[float]] = {name: [] for name in models}
  for _ in range(steps):
    for name, m in models.items():  # interleaved: load hits both alike
      t0 = time.perf_counter()
      fns[name](m.variables, x).block_until_ready()
      times[name].append(time.perf_counter() - t0)
  rec: dict[str, Any] = {"size": size, "batch": batch, "steps": steps}
  for name in models:
    rec[f"{name}_images_per_s"] = batch / statistics.median(times[name])
    rec[f"{name}_compile_s"] = compile_s[name]
  rec["ratio"] = rec["folded_images_per_s"] / rec["unfolded_images_per_s"]
  return rec


def main(argv: list[str]) -> int:
  """Runs the benchmark and prints one line per size; returns the exit status."""
  args = parse_args(argv)
  from jaxft import cpu  # pylint: disable=g-import-not-at-top
  cpu.enable()  # before JAX starts, as the command-line tools do
  import jax  # pylint: disable=g-import-not-at-top
  import jaxft  # pylint: disable=g-import-not-at-top
  from jaxft import surgery  # pylint: disable=g-import-not-at-top
  base = jaxft.create_model(args.model, jax.random.key(0))
  models = {"unfolded": base, "folded": surgery.fold_batchnorm(base)}
  layers = cpu.network_layers()
  print(f"{args.model} on {jax.devices()[0].platform}, batch {args.batch}, {args.steps} steps")
  records = []
  for size in args.sizes:
    r = bench_size(models, layers, size, args.batch, args.steps)
    records.append({"model": args.model, "platform": jax.devices()[0].platform, **r})
    print(f"{size:>4d} px: unfolded {r['unfolded_images_per_s']:9.1f} img/s, folded "
          f"{r['folded_images_per_s']:9.1f} img/s, ratio {r['ratio']:.3f}", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(records, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
