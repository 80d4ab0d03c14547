"""Throughput of jaxft against PyTorch on the same machine, in the same invocation.

    python tools/bench.py                                  # the full table (slow on CPU: ~1 h)
    python tools/bench.py --models resnet50 --sizes 32 --steps 6
    python tools/bench.py --dtype bfloat16 --json out.json --torch-compile
    python tools/bench.py --models resnet50 --vs-best     # each framework's best mode, ratio last

For every model × image size × dtype it measures a training step (on-device augmentation, forward,
backward, SGD with momentum 0.9 and weight decay 5e-4 on conv/dense kernels, BatchNorm statistics
update) and an eval forward pass, for jaxft (its real ``jaxft.train.make_train_step`` /
``make_eval_step``) and for PyTorch (torchvision's model where there is one, else a torch module built
from the same ``ModelSpec``; eager, channels_last; ``torch.compile`` with ``--torch-compile``).

Each framework runs in its own worker process (so that neither sees the other's threads, allocator or
GPU memory pool, and each has its own peak memory), and the workers run *interleaved*: after compiling
and warming up, the parent alternates rounds of steps between them, so that load from other users of
the machine hits both alike. Images/s is ``batch / median step time``; compile (first-call) time is
reported apart; peak memory is the worker's peak RSS on CPU, the device's peak bytes in use on GPU.
The jaxft/torch ratios are printed last.

The jaxft worker switches the CPU backend on first thing, as ``python -m jaxft.train`` does
(``jaxft.cpu.enable(relaunch=True)``) and builds its network with ``jaxft.cpu.network_layers()``:
XLA:CPU flags (``jaxft.cpu.flags.CPU_XLA_FLAGS``, when ``XLA_FLAGS`` is unset; ``--no-cpu-flags``
turns them off), glibc's malloc tuning (``jaxft.cpu.allocator.retain_freed_memory``;
``--no-malloc-tuning``), tcmalloc where installed (``jaxft.cpu.allocator.relaunch_with_tcmalloc``;
``--no-tcmalloc``) and oneDNN's convolutions where they build (``jaxft.cpu.onednn``; torch's CPU
convolutions are oneDNN's too; ``--no-onednn`` gives XLA's own, and ``jaxft_onednn`` in each record
says which oneDNN ran). The torch worker runs as stock PyTorch does, with glibc's default malloc,
unless ``--torch-malloc-tuning`` / ``--torch-tcmalloc`` (see ``docs/benchmarks.md``). Each record
names both workers' allocators.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

# This checkout's jaxft, in the parent as in the workers (which get it through PYTHONPATH).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_MODELS = ("resnet50", "resnet18", "cifar_resnet56", "efficientnet_lite0")
DEFAULT_BATCH = {32: 128, 224: 32}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LR, MOMENTUM, WEIGHT_DECAY, CROP_PADDING = 0.01, 0.9, 5e-4, 4
_TAG = "@@bench "


# ---------------------------------------------------------------------------------------------------
# Helpers shared by both workers
# ---------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _batch(n: int, size: int, num_classes: int, seed: int = 0) -> tuple[Any, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(seed)
  return (r.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          r.integers(0, num_classes, (n,), dtype=np.int32))


# ---------------------------------------------------------------------------------------------------
# jaxft worker
# ---------------------------------------------------------------------------------------------------


class JaxWorker:
  """Builds jaxft's own train/eval steps for one workload; ``run(mode, n)`` returns step times."""

  def __init__(self, w: dict[str, Any]):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import jaxft.cpu  # pylint: disable=g-import-not-at-top
    from jaxft import models, optim, train  # pylint: disable=g-import-not-at-top

    self.jax = jax
    model = models.create_model(w["model"], jax.random.key(0), num_classes=w["num_classes"])
    cfg = optim.default_config()
    cfg.update(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    opt = optim.build_optimizer(cfg, model.params, spec=model.spec, total_steps=10**6)
    trainable, frozen = opt.split(model.params)
    dtype = jnp.bfloat16 if w["dtype"] == "bfloat16" else jnp.float32
    net = models.Network(model.spec, dtype=dtype, frozen_bn=tuple(opt.frozen_bn),
                         layers=jaxft.cpu.network_layers(w["conv_impl"]))
    sc = train.StepConfig(crop_padding=CROP_PADDING, flip=True, out_size=None, mean=MEAN, std=STD,
                          label_smoothing=0.0)
    self.state = jax.device_put(train.TrainState.create(trainable, frozen, model.batch_stats,
                                                        opt.tx.init(trainable)))
    self.train_step = jax.jit(train.make_train_step(net, opt.tx, opt.schedule, sc, seed=0,
                                                    norm=jaxft.cpu.norm_functions().global_norm),
                              donate_argnums=(0,))
    self.eval_step = jax.jit(train.make_eval_step(net, sc))
    images, labels = _batch(w["batch"], w["size"], w["num_classes"])
    self.train_batch = jax.device_put({"image": images, "label": labels})
    images, _ = _batch(w["eval_batch"], w["size"], w["num_classes"], seed=1)
    self.eval_images = jax.device_put(images)
    self.device = str(jax.devices()[0].device_kind)
    self.memory: dict[str, float] = {}

  def compile(self, mode: str) -> float:
    t0 = time.perf_counter()
    if mode == "train":
      lowered = self.train_step.lower(self.state, self.train_batch)
    else:
      lowered = self.eval_step.lower(self.state.variables(), self.eval_images)
    compiled = lowered.compile()
    try:
      ma = compiled.memory_analysis()
      self.memory[mode] = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
                           + ma.output_size_in_bytes - ma.alias_size_in_bytes) / 2**20
    except Exception:  # pylint: disable=broad-except
      pass
    if mode == "train":
      self.train_step = compiled
    else:
      self.eval_step = compiled
    return time.perf_counter() - t0

  def run(self, mode: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      if mode == "train":
        self.state, metrics = self.train_step(self.state, self.train_batch)
        self.jax.block_until_ready(metrics)
      else:
        self.jax.block_until_ready(self.eval_step(self.state.variables(), self.eval_images))
      times.append(time.perf_counter() - t0)
    return times

  def peak_mb(self) -> dict[str, float]:
    out = {"rss": _peak_rss_mb()}
    stats = self.jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device"] = stats["peak_bytes_in_use"] / 2**20
    out.update({f"xla_{k}": v for k, v in self.memory.items()})
    return out


# ---------------------------------------------------------------------------------------------------
# PyTorch worker
# ---------------------------------------------------------------------------------------------------


def torch_from_spec(spec: Any) -> Any:
  """A torch ``nn.Module`` with the structure of a jaxft ``ModelSpec`` (for models torchvision lacks).

  Mirrors ``jaxft.models.network.Network``: stem, basic/bottleneck/mbconv blocks, ``conv`` or
  ``option_a`` shortcuts, optional neck, global pool, dropout + linear head.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  acts = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "swish": nn.SiLU}
  bn = lambda c: nn.BatchNorm2d(c, eps=spec.bn_eps, momentum=1.0 - spec.bn_momentum)
  conv = lambda ci, co, k, s=1, g=1: nn.Conv2d(ci, co, k, s, k // 2, groups=g, bias=False)

  class Block(nn.Module):

    def __init__(self, b: Any, cin: int):
      super().__init__()
      act = acts[b.act]
      self.act = act()
      if b.kind == "basic":
        self.body = nn.Sequential(conv(cin, b.width, b.kernel, b.stride), bn(b.width), act(),
                                  conv(b.width, b.out, b.kernel), bn(b.out))
      elif b.kind == "bottleneck":
        self.body = nn.Sequential(conv(cin, b.width, 1), bn(b.width), act(),
                                  conv(b.width, b.width, b.kernel, b.stride, b.groups), bn(b.width),
                                  act(), conv(b.width, b.out, 1), bn(b.out))
      else:  # mbconv
        expand = [conv(cin, b.width, 1), bn(b.width), act()] if b.width != cin else []
        self.body = nn.Sequential(*expand, conv(b.width, b.width, b.kernel, b.stride, b.width),
                                  bn(b.width), act(), conv(b.width, b.out, 1), bn(b.out))
      self.kind, self.stride, self.pad = b.kind, b.stride, 0
      self.same = b.stride == 1 and cin == b.out
      self.down = None
      if not self.same and b.kind != "mbconv":
        if spec.shortcut == "conv":
          self.down = nn.Sequential(conv(cin, b.out, 1, b.stride), bn(b.out))
        else:
          self.pad = b.out - cin

    def forward(self, x: Any) -> Any:
      h = self.body(x)
      if self.kind == "mbconv":
        return h + x if self.same else h
      if self.same:
        sc = x
      elif self.down is not None:
        sc = self.down(x)
      else:  # option A: subsample, zero-pad channels
        sc = x[:, :, ::self.stride, ::self.stride]
        lo = self.pad // 2
        sc = torch.nn.functional.pad(sc, (0, 0, 0, 0, lo, self.pad - lo))
      return self.act(h + sc)

  s = spec.stem
  layers = [conv(3, s.width, s.kernel, s.stride), bn(s.width), acts[s.act]()]
  if s.pool:
    layers.append(nn.MaxPool2d(3, 2, 1))
  cin = s.width
  for st in spec.stages:
    for b in st.blocks:
      layers.append(Block(b, cin))
      cin = b.out
  if spec.neck_width:
    layers += [conv(cin, spec.neck_width, 1), bn(spec.neck_width), acts[spec.neck_act]()]
    cin = spec.neck_width
  head = spec.heads[0]
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(head.dropout),
             nn.Linear(cin, head.num_classes)]
  return nn.Sequential(*layers)


class TorchWorker:
  """The same workload in PyTorch (eager channels_last, or ``torch.compile``)."""

  def __init__(self, w: dict[str, Any]):
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
    from jaxft import models  # pylint: disable=g-import-not-at-top

    self.torch = torch
    torch.manual_seed(0)
    self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # what a tuned torch GPU run uses
    if hasattr(torchvision.models, w["model"]):
      model = getattr(torchvision.models, w["model"])(num_classes=w["num_classes"])
    else:
      model = torch_from_spec(models.get_spec(w["model"], w["num_classes"]))
    self.model = model.to(self.dev, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    self.opt = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                {"params": no_decay, "weight_decay": 0.0}], lr=LR, momentum=MOMENTUM)
    self.fwd = torch.compile(self.model) if w["torch_compile"] else self.model
    self.amp = w["dtype"] == "bfloat16"
    self.mean = torch.tensor(MEAN, device=self.dev).view(1, 3, 1, 1) * 255
    self.std = torch.tensor(STD, device=self.dev).view(1, 3, 1, 1) * 255
    images, labels = _batch(w["batch"], w["size"], w["num_classes"])
    self.images = torch.from_numpy(images).to(self.dev)
    self.labels = torch.from_numpy(labels).long().to(self.dev)
    self.eval_images = torch.from_numpy(_batch(w["eval_batch"], w["size"], w["num_classes"],
                                               seed=1)[0]).to(self.dev)
    self.device = torch.cuda.get_device_name() if self.dev.type == "cuda" else platform.processor()

  def _input(self, images: Any, train: bool) -> Any:
    torch = self.torch
    x = images.permute(0, 3, 1, 2).float()  # NHWC memory: already channels_last
    if train:  # same augmentation as jaxft's: pad-and-crop at a per-example offset, random flip
      n, _, h, w = x.shape
      p = CROP_PADDING
      x = torch.nn.functional.pad(x, (p, p, p, p))
      oy, ox = torch.randint(0, 2 * p + 1, (2, n), device=self.dev)
      rows = (oy[:, None] + torch.arange(h, device=self.dev))[:, None, :, None]
      cols = (ox[:, None] + torch.arange(w, device=self.dev))[:, None, None, :]
      x = x[torch.arange(n, device=self.dev)[:, None, None, None],
            torch.arange(3, device=self.dev)[None, :, None, None], rows, cols]
      flip = torch.rand(n, device=self.dev) < 0.5
      x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = (x - self.mean) / self.std
    return x.contiguous(memory_format=torch.channels_last)

  def _step(self, mode: str) -> None:
    torch = self.torch
    with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
      if mode == "train":
        self.model.train()
        loss = torch.nn.functional.cross_entropy(self.fwd(self._input(self.images, True)),
                                                 self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
      else:
        self.model.eval()
        with torch.inference_mode():
          self.fwd(self._input(self.eval_images, False))
    if self.dev.type == "cuda":
      torch.cuda.synchronize()

  def compile(self, mode: str) -> float:
    t0 = time.perf_counter()
    self._step(mode)
    return time.perf_counter() - t0

  def run(self, mode: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      self._step(mode)
      times.append(time.perf_counter() - t0)
    return times

  def peak_mb(self) -> dict[str, float]:
    out = {"rss": _peak_rss_mb()}
    if self.dev.type == "cuda":
      out["device"] = self.torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_main(framework: str, args: argparse.Namespace) -> None:
  """Serves JSON commands from stdin, one per line; answers on stdout after ``_TAG``."""
  from jaxft.cpu import allocator  # pylint: disable=g-import-not-at-top
  if framework == "jaxft":
    import jaxft.cpu  # pylint: disable=g-import-not-at-top
    # Before JAX starts and before stdin is read (a relaunch re-executes this worker with the same
    # pipes); JAXFT_CPU_FLAGS / JAXFT_MALLOC_TUNING / JAXFT_ONEDNN from the parent are its opt-outs.
    jaxft.cpu.enable(relaunch=not args.no_tcmalloc)
  elif args.torch_malloc_tuning:
    allocator.retain_freed_memory()
  out = sys.stdout
  sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
  worker = None
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if cmd["op"] == "setup":
        worker = (JaxWorker if framework == "jaxft" else TorchWorker)(cmd)
        reply: Any = {"device": worker.device, "allocator": allocator.loaded_allocator()}
        if framework == "jaxft":
          from jaxft.cpu import onednn  # pylint: disable=g-import-not-at-top
          reply["onednn"] = onednn.status()
      elif cmd["op"] == "compile":
        reply = worker.compile(cmd["mode"])
      elif cmd["op"] == "run":
        reply = worker.run(cmd["mode"], cmd["n"])
      elif cmd["op"] == "peak":
        reply = worker.peak_mb()
      else:
        break
    except Exception as e:  # pylint: disable=broad-except
      reply = {"error": f"{type(e).__name__}: {e}"}
    out.write(_TAG + json.dumps(reply) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------------------------
# Parent: spawn both workers per workload, interleave, report
# ---------------------------------------------------------------------------------------------------


class Worker:
  """A worker process and its command pipe."""

  def __init__(self, framework: str, env: dict[str, str], flags: list[str]):
    self.framework = framework
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", framework,
                                  *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)

  def ask(self, **cmd: Any) -> Any:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    for line in self.proc.stdout:
      if line.startswith(_TAG):
        reply = json.loads(line[len(_TAG):])
        if isinstance(reply, dict) and "error" in reply:
          raise RuntimeError(f"{self.framework} worker: {reply['error']}")
        return reply
    raise RuntimeError(f"{self.framework} worker exited (code {self.proc.wait()})")

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait(timeout=60)


# A variant: (label, framework, overrides of the workload). Records key everything by label.
Variant = tuple[str, str, dict[str, Any]]


def bench_workload(w: dict[str, Any], args: argparse.Namespace,
                   variants: list[Variant] | None = None) -> list[dict[str, Any]]:
  """Workers for one model × size × dtype, interleaved; returns one record per mode.

  ``variants`` default to jaxft and torch on ``w`` as it is (record keys ``jaxft_*``, ``torch_*``
  and ``ratio``); otherwise each ``(label, framework, overrides)`` is a worker on ``w | overrides``
  and its numbers are keyed by ``label``.
  """
  if variants is None:
    variants = [("jaxft", "jaxft", {})] + ([] if args.no_torch else [("torch", "torch", {})])
  env = dict(os.environ)
  # On GPU both workers share the device: jax must not grab 75% of its memory up front.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
  frameworks = [label for label, _, _ in variants]
  framework_of = {label: f for label, f, _ in variants}
  # The torch worker imports jaxft only for model specs and runs as stock PyTorch does.
  torch_env = dict(env)
  # The jaxft worker's opt-outs, read by jaxft.cpu.enable().
  if args.no_cpu_flags:
    env["JAXFT_CPU_FLAGS"] = "0"
  if args.no_malloc_tuning:
    env["JAXFT_MALLOC_TUNING"] = "0"
  if args.no_onednn:
    env["JAXFT_ONEDNN"] = "0"
  from jaxft.cpu import allocator  # pylint: disable=g-import-not-at-top
  # A tcmalloc already in this process's LD_PRELOAD goes only to the workers that want it: the jaxft
  # worker relaunches itself under tcmalloc (unless --no-tcmalloc), the torch worker gets it only with
  # --torch-tcmalloc.
  env, torch_env = allocator.without_tcmalloc(env), allocator.without_tcmalloc(torch_env)
  tcmalloc = allocator.find_tcmalloc()
  if tcmalloc and args.torch_tcmalloc:
    torch_env = allocator.tcmalloc_env(torch_env, tcmalloc)
  flags = {"jaxft": ["--no-tcmalloc"] if args.no_tcmalloc else [],
           "torch": ["--torch-malloc-tuning"] if args.torch_malloc_tuning else []}
  workers = {label: Worker(f, torch_env if f == "torch" else env, flags[f])
             for label, f, _ in variants}
  records = []
  try:
    setups = {label: workers[label].ask(op="setup", **{**w, **over}) for label, _, over in variants}
    devices = {f: s["device"] for f, s in setups.items()}
    for mode in args.modes:
      rec: dict[str, Any] = dict(w, mode=mode, batch=w["batch"] if mode == "train" else w["eval_batch"])
      times: dict[str, list[float]] = {f: [] for f in frameworks}
      for f, wk in workers.items():
        rec[f"{f}_compile_s"] = wk.ask(op="compile", mode=mode)
        wk.ask(op="run", mode=mode, n=args.warmup)
      # Interleave: short rounds alternate between the frameworks until each has args.steps steps.
      per_round = max(1, args.steps // args.rounds)
      while any(len(t) < args.steps for t in times.values()):
        for f, wk in workers.items():
          n = min(per_round, args.steps - len(times[f]))
          if n:
            times[f] += wk.ask(op="run", mode=mode, n=n)
      for f in frameworks:
        med = statistics.median(times[f])
        rec[f"{f}_step_s"] = med
        rec[f"{f}_images_per_s"] = rec["batch"] / med
        rec[f"{f}_step_spread"] = (max(times[f]) - min(times[f])) / med
        rec[f"{f}_device"] = devices[f]
        rec[f"{f}_allocator"] = setups[f]["allocator"]
      rec["jaxft_onednn"] = next((setups[f].get("onednn") for f in frameworks
                                  if framework_of[f] == "jaxft"), None)
      if "torch" in frameworks and "jaxft" in frameworks:
        rec["ratio"] = rec["jaxft_images_per_s"] / rec["torch_images_per_s"]
      records.append(rec)
      print(f"  {w['model']:>20} {w['size']:>3}px {w['dtype']:>8} {mode:>5} b{rec['batch']:<4} "
            + "  ".join(f"{f} {rec[f'{f}_images_per_s']:8.4g} img/s (compile {rec[f'{f}_compile_s']:.1f}s)"
                        for f in frameworks)
            + (f"  ratio {rec['ratio']:.2f}" if "ratio" in rec else ""), flush=True)
    peaks = {f: wk.ask(op="peak") for f, wk in workers.items()}
    for rec in records:
      for f in frameworks:
        rec[f"{f}_peak_mb"] = peaks[f]
  finally:
    for wk in workers.values():
      wk.close()
  return records



# --vs-best: every mode of each framework, in groups of two interleaved workers (at most two models
# in memory at once): jaxft and torch eager in float32, the same in bfloat16 (torch: autocast), then
# torch.compile in both.
VS_BEST_GROUPS: list[list[Variant]] = [
    [("jaxft_fp32", "jaxft", {"dtype": "float32"}),
     ("torch_fp32", "torch", {"dtype": "float32", "torch_compile": False})],
    [("jaxft_bf16", "jaxft", {"dtype": "bfloat16"}),
     ("torch_bf16", "torch", {"dtype": "bfloat16", "torch_compile": False})],
    [("torch_fp32_compile", "torch", {"dtype": "float32", "torch_compile": True}),
     ("torch_bf16_compile", "torch", {"dtype": "bfloat16", "torch_compile": True})],
]


def bench_vs_best(w: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
  """Every precision and mode of both frameworks on one model × size; one record per mode with
  each variant's images/s, the best of each framework and ``ratio_best`` = jaxft-best / torch-best."""
  merged: dict[str, dict[str, Any]] = {}
  for group in VS_BEST_GROUPS:
    for rec in bench_workload(dict(w, dtype="best"), args, group):
      merged.setdefault(rec["mode"], {}).update(rec)
  records = []
  for mode, rec in merged.items():
    rec.pop("ratio", None)
    for fw in ("jaxft", "torch"):
      labels = [label for g in VS_BEST_GROUPS for label, f, _ in g
                if f == fw and f"{label}_images_per_s" in rec]
      best = max(labels, key=lambda label: rec[f"{label}_images_per_s"])
      rec[f"{fw}_best"] = best
      rec[f"{fw}_best_images_per_s"] = rec[f"{best}_images_per_s"]
    rec["ratio_best"] = rec["jaxft_best_images_per_s"] / rec["torch_best_images_per_s"]
    records.append(rec)
  return records


def print_vs_best(records: list[dict[str, Any]]) -> None:
  labels = [label for g in VS_BEST_GROUPS for label, _, _ in g]
  print("\n| model | size | mode | batch | " + " | ".join(labels) + " | jaxft-best / torch-best |")
  print("|---|---|---|---|" + "---|" * len(labels) + "---|")
  for r in records:
    cells = [f"{r[f'{label}_images_per_s']:.4g}" if f"{label}_images_per_s" in r else "—"
             for label in labels]
    print(f"| {r['model']} | {r['size']} | {r['mode']} | {r['batch']} | " + " | ".join(cells)
          + f" | **{r['ratio_best']:.2f}** ({r['jaxft_best']} / {r['torch_best']}) |")
  print("\njaxft-best / torch-best images/s:")
  for r in records:
    print(f"  {r['model']:>20} {r['size']:>3}px {r['mode']:>5}: {r['ratio_best']:.2f}"
          f"  ({r['jaxft_best']} {r['jaxft_best_images_per_s']:.4g} / {r['torch_best']} "
          f"{r['torch_best_images_per_s']:.4g} img/s)")


def available_models(names: list[str]) -> list[str]:
  from jaxft import models  # pylint: disable=g-import-not-at-top
  known = set(models.list_archs())
  for n in names:
    if n not in known:
      print(f"skipping {n}: not in the jaxft zoo", file=sys.stderr)
  return [n for n in names if n in known]


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated zoo names")
  p.add_argument("--sizes", default="32,224", help="comma-separated image sizes")
  p.add_argument("--dtype", default="float32", help="float32, bfloat16, or both comma-separated")
  p.add_argument("--modes", default="train,eval", help="train, eval or both")
  p.add_argument("--batch", type=int, default=0, help="train batch (default 128 at 32 px, 32 at 224)")
  p.add_argument("--eval-batch", type=int, default=0, help="eval batch (default: the train batch)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per framework and mode")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--rounds", type=int, default=0,
                 help="interleaving rounds (default: steps/2, i.e. 2 steps per turn)")
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--conv-impl", default="auto", choices=("auto", "lax", "matmul", "hybrid", "onednn"),
                 help="jaxft convolution implementation (auto: see jaxft.cpu.impl.resolve_impl)")
  p.add_argument("--no-onednn", action="store_true",
                 help="jaxft worker with XLA's own convolutions only (sets JAXFT_ONEDNN=0)")
  p.add_argument("--no-cpu-flags", action="store_true",
                 help="jaxft worker without jaxft.cpu.flags.CPU_XLA_FLAGS (sets JAXFT_CPU_FLAGS=0)")
  p.add_argument("--no-malloc-tuning", action="store_true",
                 help="jaxft worker without jaxft.cpu.allocator.retain_freed_memory "
                 "(JAXFT_MALLOC_TUNING=0)")
  p.add_argument("--torch-malloc-tuning", action="store_true",
                 help="apply jaxft.cpu.allocator.retain_freed_memory to the torch worker too")
  p.add_argument("--no-tcmalloc", action="store_true",
                 help="jaxft worker with glibc malloc even where tcmalloc is installed")
  p.add_argument("--torch-tcmalloc", action="store_true",
                 help="run the torch worker under tcmalloc too (where installed)")
  p.add_argument("--torch-compile", action="store_true", help="torch.compile the torch model")
  p.add_argument("--vs-best", action="store_true",
                 help="each framework's best mode: jaxft fp32/bf16 vs torch fp32/bf16-autocast, "
                 "eager and torch.compile (ignores --dtype, --torch-compile, --no-torch); prints "
                 "jaxft-best / torch-best last")
  p.add_argument("--no-torch", action="store_true", help="jaxft only")
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
  p.add_argument("--json", default="", help="also write the records to this file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.modes = [m for m in args.modes.split(",") if m]
  args.rounds = args.rounds or max(1, args.steps // 2)
  return args


def _finish(args: argparse.Namespace, argv: list[str], started: str, load: tuple[float, ...],
            records: list[dict[str, Any]]) -> None:
  """Writes ``--json`` (records and the run's conditions) and prints the closing load average."""
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"started": started, "argv": argv, "host": platform.node(),
                 "cpus": os.cpu_count(), "load_average_start": load,
                 "load_average_end": os.getloadavg(), "records": records}, f, indent=2)
  print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.worker:
    if args.worker == "torch" and args.threads:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(args.threads)
    worker_main(args.worker, args)
    return 0
  names = available_models([m for m in args.models.split(",") if m])
  sizes = [int(s) for s in args.sizes.split(",") if s]
  dtypes = [d for d in args.dtype.split(",") if d]
  started = time.strftime("%Y-%m-%d %H:%M:%S")
  load = os.getloadavg()
  print(f"# {started}  {platform.node()}  {platform.processor() or platform.machine()}  "
        f"{os.cpu_count()} CPUs  python {platform.python_version()}  load average {load[0]:.1f}",
        flush=True)
  records = []
  # --vs-best runs every precision itself: one pass with dtype "best".
  for dtype in (["best"] if args.vs_best else dtypes):
    for size in sizes:
      for name in names:
        batch = args.batch or DEFAULT_BATCH.get(size, 32)
        w = {"model": name, "size": size, "dtype": dtype, "batch": batch,
             "eval_batch": args.eval_batch or batch, "num_classes": args.num_classes,
             "conv_impl": args.conv_impl, "torch_compile": args.torch_compile,
             "no_cpu_flags": args.no_cpu_flags}
        try:
          records += bench_vs_best(w, args) if args.vs_best else bench_workload(w, args)
        except RuntimeError as e:
          print(f"  {name} {size}px {dtype}: FAILED: {e}", file=sys.stderr, flush=True)
  if args.vs_best:
    _finish(args, argv, started, load, records)
    print_vs_best(records)
    return 0

  print("\n| model | size | dtype | mode | batch | jaxft img/s | torch img/s | jaxft/torch | "
        "compile s (jaxft/torch) | peak MB (jaxft/torch) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in records:
    torch_ips = f"{r['torch_images_per_s']:.4g}" if "torch_images_per_s" in r else "—"
    ratio = f"**{r['ratio']:.2f}**" if "ratio" in r else "—"
    mem = lambda f: (f"{r[f + '_peak_mb'].get('device', r[f + '_peak_mb']['rss']):.0f}"
                     if f + "_peak_mb" in r else "—")
    print(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['mode']} | {r['batch']} | "
          f"{r['jaxft_images_per_s']:.4g} | {torch_ips} | {ratio} | "
          f"{r['jaxft_compile_s']:.1f} / {r.get('torch_compile_s', float('nan')):.1f} | "
          f"{mem('jaxft')} / {mem('torch')} |")
  _finish(args, argv, started, load, records)
  print("\njaxft/torch images/s ratios:")
  for r in records:
    if "ratio" in r:
      print(f"  {r['model']:>20} {r['size']:>3}px {r['dtype']:>8} {r['mode']:>5}: {r['ratio']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
