"""The jaxft input pipeline at real scale, against torchvision, in one run.

    python tools/bench_data.py                          # 10k and 100k folders (the 100k one takes a while)
    python tools/bench_data.py --sizes 2000,20000 --batches 20 --train-steps 3   # a quick run
    python tools/bench_data.py --make-only              # only build (and cache) the folders

1. **Folders.** Synthetic ImageFolders of ``--sizes`` images (default 10,000 and 100,000), cached under
   ``--root`` (default ``/tmp/jaxft_bench_data``) as ``ROOT/n<N>/train/<class>/<i>.jpg``: real CIFAR-10
   JPEGs from ``../shared`` (image ``i % 50000``), each resized to a random width and height in
   160–500 px (bicubic) and saved as JPEG quality 90. Seeded: the same folder every time; a folder is
   written to a temporary name and renamed when complete, so an interrupted build is redone.
2. **Loader throughput** at 224 px on the smallest folder: jaxft's stream (``jaxft.data.stream``:
   random-resized crop 224 + flip, ``--workers`` grain worker processes) against torchvision's
   ``ImageFolder`` + ``DataLoader`` (``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` +
   ``PILToTensor``, the same batch and the same number of workers), interleaved in rounds so that load
   from other users of the machine hits both alike; images/s is the median over rounds.
3. **Peak RSS of a 224 px training run** (``python -m jaxft.train``, ``data.pipeline='stream'``, a small
   CIFAR ResNet at batch ``--rss-batch`` so that the model's memory does not hide the data's, 1% held
   out and evaluated at the end) on every folder, each run in its own process: the summed RSS of its
   process tree (the run and its grain workers, sampled every 50 ms) and its largest process's peak
   (the kernel's, from ``wait4``).
4. **Data-wait fraction** of a real 224 px ResNet-50 training run (random init, ``--train-steps`` steps
   on the smallest folder): the share of the loop's wall time spent waiting for the next batch
   (``StreamIterator.wait_seconds``), after the first (compiling) step.

The ratios come last. Run it niced on a shared machine: ``nice -n 19 python tools/bench_data.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

# This checkout's jaxft, in this process as in the children (which get it through PYTHONPATH).
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("JAXFT_SHARED", REPO.parent / "shared"))  # as tests/conftest.py
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg-train.tar.gz"
MIN_SIDE, MAX_SIDE, QUALITY = 160, 500, 90
_TAG = "@@bench_data "


# ---------------------------------------------------------------------------------------------------
# 1. Folders
# ---------------------------------------------------------------------------------------------------


def _cifar_images(tar_path: Path) -> list[tuple[str, bytes]]:
  """``(class, jpeg bytes)`` of the CIFAR JPEGs in the archive: the first of each class (sorted by
  path), then the second of each, …"""
  out = []
  with tarfile.open(tar_path, "r:gz") as tar:
    for m in tar:
      if m.isfile() and m.name.endswith(".jpg"):
        out.append((m.name, m.name.split("/")[-2], tar.extractfile(m).read()))
  out.sort()
  # Round-robin over the classes, so that any prefix is balanced.
  by_class: dict[str, list[bytes]] = {}
  for _, c, b in out:
    by_class.setdefault(c, []).append(b)
  classes = sorted(by_class)
  per_class = min(len(v) for v in by_class.values())
  return [(c, by_class[c][j]) for j in range(per_class) for c in classes]


def make_folder(root: Path, n: int, tar_path: Path = CIFAR_TAR) -> Path:
  """``root/n<n>/train/<class>/<i>.jpg``, built once (returns the cached folder when complete).

  Returns:
    The folder holding ``train/``.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  done = root / f"n{n}"
  if (done / "train").is_dir():
    return done
  if not tar_path.is_file():
    raise SystemExit(f"bench_data: {tar_path} not found; it needs the shared CIFAR-10 JPEGs (../shared, or set JAXFT_SHARED / --cifar)")
  root.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".n{n}.", dir=root))
  t0 = time.perf_counter()
  images = _cifar_images(tar_path)
  rng = np.random.default_rng(n)
  sides = rng.integers(MIN_SIDE, MAX_SIDE + 1, (n, 2))
  for i in range(n):
    cls, jpeg = images[i % len(images)]
    d = tmp / "train" / cls
    d.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(jpeg)) as im:
      big = im.convert("RGB").resize((int(sides[i, 0]), int(sides[i, 1])), Image.BICUBIC)
    big.save(d / f"{i:06d}.jpg", quality=QUALITY)
    if (i + 1) % 10000 == 0:
      print(f"bench_data: {done}: {i + 1}/{n} images, {time.perf_counter() - t0:.0f} s", flush=True)
  os.replace(tmp, done)
  return done


# ---------------------------------------------------------------------------------------------------
# 2. Loader throughput: jaxft's stream against torchvision's ImageFolder + DataLoader
# ---------------------------------------------------------------------------------------------------


def jaxft_loader(folder: Path, size: int, batch: int, workers: int, cache_dir: Path,
                 held: bool = False) -> Any:
  """jaxft's training stream over ``folder`` (random-resized crop ``size`` + flip), from step 0; with
  ``held``, the folder held decoded (``data.pipeline='auto'``'s fast path, the same batches)."""
  from jaxft.data import decoded, stream  # pylint: disable=g-import-not-at-top

  source = stream.open_folder(f"folder:{folder}", "train", num_workers=workers, cache_dir=cache_dir)
  if held:
    source = decoded.decode_source(source, size, cache_dir=cache_dir, num_workers=workers)
  ds = stream.train_dataset(source, stream.StreamOptions(size=size), batch_size=batch, seed=0,
                            process_index=0, process_count=1)
  return stream.StreamIterator(ds, 0, num_workers=workers)


def torch_loader(folder: Path, size: int, batch: int, workers: int) -> Any:
  """torchvision's ImageFolder + DataLoader over ``folder`` with the same transforms, shuffled."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top

  tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                           transforms.PILToTensor()])
  ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
  return iter(torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                          drop_last=True, persistent_workers=False,
                                          generator=torch.Generator().manual_seed(0)))


def _time_batches(it: Any, warmup: int, n: int) -> float:
  """Images/s over ``n`` batches of ``it`` after ``warmup`` (worker start-up) batches."""
  for _ in range(warmup):
    next(it)
  t0, images = time.perf_counter(), 0
  for _ in range(n):
    b = next(it)
    images += len(b[1] if isinstance(b, tuple) and len(b) == 3 else b[0])
  return images / (time.perf_counter() - t0)


def loader_throughput(folder: Path, size: int, batch: int, workers: int, batches: int, rounds: int,
                      cache_dir: Path, held: bool) -> dict[str, Any]:
  """Median images/s of both loaders (and with ``held`` jaxft's decoded fast path) over ``rounds``
  alternating rounds, each a fresh loader (so an idle one prefetches nothing while another is timed)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # DataLoader workers use one thread each; the parent only collates
  jaxft_loader(folder, size, batch, workers, cache_dir, held).close()  # file check, decode: untimed
  # Past start-up *and* the prefetch buffers (grain's are larger than the DataLoader's 2 per worker):
  # a timed window that began on full buffers would count batches built before it.
  from jaxft.data import stream  # pylint: disable=g-import-not-at-top
  warmup = stream.buffered_batches(workers, 2, 2) + 4
  names = ["jaxft", "torchvision"] + (["jaxft_held"] if held else [])
  out: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      if name.startswith("jaxft"):
        with jaxft_loader(folder, size, batch, workers, cache_dir, name == "jaxft_held") as it:
          out[name].append(_time_batches(it, warmup, batches))
      else:
        it = torch_loader(folder, size, batch, workers)
        out[name].append(_time_batches(it, warmup, batches))
        del it
      print(f"bench_data: round {r}: {name} {out[name][-1]:.1f} images/s", flush=True)
  return {k: {"median": statistics.median(v), "rounds": v} for k, v in out.items()}


def transform_cost(files: list[str], size: int, rounds: int = 5) -> dict[str, float]:
  """Median ms per image of the stream's train transform (random-resized crop + flip) from each file,
  and from the same image held decoded (the ``auto`` fast path), in interleaved rounds, one process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxft.data import decode, host_transforms  # pylint: disable=g-import-not-at-top

  held = [np.asarray(decode.to_rgb(Image.open(f))) for f in files]
  out: dict[str, list[float]] = {"files": [], "held": []}
  for _ in range(rounds):
    for name, inputs in (("files", files), ("held", held)):
      rng = np.random.default_rng(0)
      t0 = time.perf_counter()
      for x in inputs:
        host_transforms.train_transform(x, rng, size)
      out[name].append((time.perf_counter() - t0) / len(inputs) * 1e3)
  return {k: statistics.median(v) for k, v in out.items()}


def cifar_files(root: Path, n: int, tar_path: Path) -> list[str]:
  """The first ``n`` CIFAR JPEGs (32 px, round-robin over classes), written once under ``root``."""
  d = root / "cifar32"
  if not d.is_dir():
    tmp = Path(tempfile.mkdtemp(prefix=".cifar32.", dir=root))
    for i, (cls, jpeg) in enumerate(_cifar_images(tar_path)[:n]):
      (tmp / f"{i:05d}-{cls}.jpg").write_bytes(jpeg)
    os.replace(tmp, d)
  return sorted(str(f) for f in d.iterdir())[:n]


# ---------------------------------------------------------------------------------------------------
# 3. / 4. Training runs: peak RSS, data-wait fraction
# ---------------------------------------------------------------------------------------------------


def train_run(folder: Path, workdir: Path, cache_dir: Path, *, arch: str, size: int, batch: int,
              steps: int, workers: int, val_fraction: float, extra: tuple[str, ...] = ()) -> dict[str, Any]:
  """``python -m jaxft.train`` on ``folder`` with the stream pipeline (random init of ``arch``), in a
  process of its own; its peak RSS (the whole process tree's summed RSS, sampled every 50 ms, and the
  largest single process's, from the kernel) and its data-wait fraction after the first step.

  Returns:
    ``{'peak_rss_mb', 'max_process_rss_mb', 'data_wait', 'seconds', 'steps'}``.
  """
  import psutil  # pylint: disable=g-import-not-at-top  (a jaxft[test] dependency, via optuna/torch)

  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "jaxft.train", "--config", str(REPO / "configs" / "tiny.py"),
         f"--config.model.arch={arch}", "--config.model.num_classes=10",
         f"--config.data.source=folder:{folder}", "--config.data.pipeline=stream",
         f"--config.data.image_size={size}", f"--config.data.workers={workers}",
         f"--config.data.val_fraction={val_fraction}", f"--config.data.cache_dir={cache_dir}",
         f"--config.train.batch_size={batch}", f"--config.train.num_steps={steps}",
         "--config.train.eval_every=0", f"--config.train.checkpoint_every={steps}",
         f"--config.train.eval_batch_size={batch}", "--workdir", str(workdir), *extra]
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  workdir.mkdir(parents=True)
  log = workdir.parent / f"{workdir.name}.log"  # a file, not a pipe: a full pipe would stall the run
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  peak, root = 0, psutil.Process(proc.pid)
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this run's own rusage, when it ends
    if pid:
      break
    try:
      tree = [root] + root.children(recursive=True)
      peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      pass
    time.sleep(0.05)
  seconds = time.perf_counter() - t0
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"bench_data: the training run failed ({os.waitstatus_to_exitcode(status)}):\n"
                     f"{log.read_text()[-3000:]}")
  max_child = usage.ru_maxrss / 1024  # the largest process of this run's tree (kernel's count)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r.get("split") == "train" and r["step"] > 1]
  # Weighted by each step's duration: total wait / total time after the compiling first step.
  dts = [batch / r["images_per_s"] for r in train]
  wait = sum(r["data_wait"] * dt for r, dt in zip(train, dts)) / max(sum(dts), 1e-9)
  return {"peak_rss_mb": peak / 2**20, "max_process_rss_mb": max_child, "data_wait": wait,
          "seconds": seconds, "steps": steps}


def folder_bytes(folder: Path) -> int:
  return sum(f.stat().st_size for f in folder.rglob("*.jpg"))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="/tmp/jaxft_bench_data", help="where the folders are cached")
  p.add_argument("--sizes", default="10000,100000", help="image counts of the folders, comma-separated")
  p.add_argument("--cifar", default=str(CIFAR_TAR), help="the CIFAR-10 JPEG archive the images come from")
  p.add_argument("--make-only", action="store_true", help="build the folders and stop")
  p.add_argument("--size", type=int, default=224, help="crop side in pixels")
  p.add_argument("--batch", type=int, default=64, help="loader batch size")
  p.add_argument("--workers", type=int, default=2, help="worker processes, both loaders")
  p.add_argument("--batches", type=int, default=20, help="timed batches per loader per round")
  p.add_argument("--rounds", type=int, default=5, help="alternating rounds per loader")
  p.add_argument("--only", default="fastpath,loader,rss,wait", help="which parts to run")
  p.add_argument("--no-held", action="store_true", help="skip the decoded fast path's throughput")
  p.add_argument("--rss-arch", default="cifar_resnet8", help="the model of the peak-RSS runs")
  p.add_argument("--rss-steps", type=int, default=20, help="steps of each peak-RSS run")
  p.add_argument("--rss-batch", type=int, default=16, help="batch of each peak-RSS run")
  p.add_argument("--val-fraction", type=float, default=0.01, help="held out in the peak-RSS runs")
  p.add_argument("--train-steps", type=int, default=6, help="steps of the ResNet-50 data-wait run")
  p.add_argument("--train-batch", type=int, default=16, help="batch of the ResNet-50 data-wait run")
  args = p.parse_args()
  root = Path(args.root)
  sizes = sorted(int(s) for s in args.sizes.split(","))
  folders = {n: make_folder(root, n, Path(args.cifar)) for n in sizes}
  if args.make_only:
    for n, f in folders.items():
      print(f"bench_data: {f}: {n} images, {folder_bytes(f) / 2**20:.0f} MiB")
    return
  only = set(args.only.split(","))
  cache_dir = root / "cache"
  record: dict[str, Any] = {"sizes": sizes, "size": args.size, "batch": args.batch,
                            "workers": args.workers, "cpus": os.cpu_count()}
  if "fastpath" in only:
    big = sorted(str(f) for f in (folders[sizes[0]] / "train").rglob("*.jpg"))[:300]
    record["fastpath"] = {"folder_224": transform_cost(big, args.size),
                          "cifar32_112": transform_cost(cifar_files(root, 2000, Path(args.cifar)), 112)}
    print(f"bench_data: fast path: {record['fastpath']}", flush=True)
  if "loader" in only:
    record["loader"] = loader_throughput(folders[sizes[0]], args.size, args.batch, args.workers,
                                         args.batches, args.rounds, cache_dir, not args.no_held)
  if "rss" in only:
    record["rss"] = {}
    for n, f in folders.items():
      from jaxft.data import stream  # pylint: disable=g-import-not-at-top
      stream.open_folder(f"folder:{f}", "train", num_workers=args.workers, cache_dir=cache_dir)  # check once
      record["rss"][n] = train_run(f, root / "runs" / f"rss{n}", cache_dir, arch=args.rss_arch,
                                   size=args.size, batch=args.rss_batch, steps=args.rss_steps,
                                   workers=args.workers, val_fraction=args.val_fraction)
      print(f"bench_data: {n} images: {record['rss'][n]}", flush=True)
  if "wait" in only:
    record["wait"] = train_run(folders[sizes[0]], root / "runs" / "resnet50", cache_dir, arch="resnet50",
                               size=args.size, batch=args.train_batch, steps=args.train_steps,
                               workers=args.workers, val_fraction=0.0)
    print(f"bench_data: resnet50: {record['wait']}", flush=True)
  print(_TAG + json.dumps(record), flush=True)
  if "fastpath" in only:
    for k, v in record["fastpath"].items():
      print(f"train transform ({k}): {v['files']:.3f} ms/image from files, {v['held']:.3f} held decoded "
            f"({v['files'] / v['held']:.2f}x)")
  if "rss" in only:
    for n, r in record["rss"].items():
      print(f"peak RSS of a {args.size} px training run ({args.rss_arch}, {args.rss_steps} steps, batch "
            f"{args.rss_batch}, {args.workers} workers, val {args.val_fraction:g}) on {n} images: {r['peak_rss_mb']:.0f} MiB (process tree), "
            f"largest process {r['max_process_rss_mb']:.0f} MiB")
  if "wait" in only:
    w = record["wait"]
    print(f"data-wait fraction of a {args.size} px ResNet-50 run ({args.train_steps} steps, batch "
          f"{args.train_batch}, {args.workers} workers, after step 1): {w['data_wait']:.1%}")
  if "loader" in only:
    lo = record["loader"]
    print(f"loader at {args.size} px, {args.workers} workers, batch {args.batch}: jaxft "
          f"{lo['jaxft']['median']:.1f} images/s, torchvision {lo['torchvision']['median']:.1f} images/s")
    if "jaxft_held" in lo:
      print(f"jaxft held decoded (data.pipeline=auto's fast path): {lo['jaxft_held']['median']:.1f} "
            f"images/s ({lo['jaxft_held']['median'] / lo['jaxft']['median']:.2f}x the files)")
  if "rss" in only and len(sizes) > 1:
    small, large = record["rss"][sizes[0]], record["rss"][sizes[-1]]
    print(f"ratio peak RSS {sizes[-1]} / {sizes[0]} images: "
          f"{large['peak_rss_mb'] / small['peak_rss_mb']:.3f}")
  if "loader" in only:
    print(f"ratio jaxft / torchvision: {lo['jaxft']['median'] / lo['torchvision']['median']:.2f}x")


if __name__ == "__main__":
  main()
