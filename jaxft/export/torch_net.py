"""A PyTorch module built from a :class:`~jaxft.models.ModelSpec`: :class:`TorchNetwork` and :func:`to_torch`.

:class:`TorchNetwork` is written against the spec, as :class:`~jaxft.models.network.Network` is: one
module for every structure surgery can produce, whose forward pass follows ``Network``'s line by line
(symmetric ``k // 2`` padding, or TensorFlow ``SAME`` for the strided convs of ``padding='same'`` specs;
option-A shortcuts; adapters after their block; eval-mode BatchNorm with the spec's epsilon). Its
submodules sit at the torch names of :func:`jaxft.export.state.module_names`, so its ``state_dict()`` has
exactly the keys of :func:`~jaxft.export.state.torch_state_dict`. This is the only jaxft module that
imports torch.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from jaxft import paths
from jaxft.export.state import module_names, prepare, torch_state_dict
from jaxft.models.model import Model
from jaxft.models.network import head_module_name
from jaxft.models.spec import BlockSpec, ModelSpec

# jaxft's activations (jaxft.models.layers.ACTIVATIONS) in torch, same numerics.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "hard_swish": F.hardswish,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,  # slope 0.01 in both
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


class SameConv2d(nn.Conv2d):
  """A conv padded as TensorFlow's ``SAME`` (the odd pixel at the bottom/right), computed per input
  size; built with ``padding=0``. Same parameters as ``nn.Conv2d``."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
    pads = []
    for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                       (x.shape[-2], self.kernel_size[0], self.stride[0])):
      total = max((-(-size // s) - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]
    return super().forward(F.pad(x, pads))


def conv_configs(spec: ModelSpec) -> dict[str, tuple[int, int, bool]]:
  """Returns ``{conv module path: (stride, groups, spatial)}`` for ``Network(spec)``'s convs; ``spatial``
  marks those that pad per ``spec.padding`` (``network.padded_conv``). 1×1 convs not listed have stride
  1 and one group."""
  out = {"stem/conv": (spec.stem.stride, 1, True)}
  for st in spec.stages:
    for b in st.blocks:
      p = f"{st.name}/{b.name}"
      out[f"{p}/downsample_conv"] = (b.stride, 1, False)
      if b.kind == "basic":
        out[f"{p}/conv1"] = (b.stride, 1, True)
      elif b.kind == "bottleneck":
        out[f"{p}/conv2"] = (b.stride, b.groups, True)
      elif b.kind == "mbconv":
        out[f"{p}/depthwise_conv"] = (b.stride, b.width, True)
  return out


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
  """Registers ``module`` at dotted ``name`` under ``root``, creating plain containers on the way."""
  *parents, last = name.split(".")
  node = root
  for part in parents:
    if part not in node._modules:  # pylint: disable=protected-access — torch has no public "has child"
      node.add_module(part, nn.Module())
    node = getattr(node, part)
  node.add_module(last, module)


def _make(spec: ModelSpec, path: str, shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
  """The torch module for jaxft module ``path`` of ``Network(spec)``, shaped from ``shapes``."""
  kernel = shapes.get(f"params/{path}/kernel")
  if kernel is None:  # a BatchNorm; torch's momentum is 1 - flax's
    return nn.BatchNorm2d(shapes[f"params/{path}/scale"][0], eps=spec.bn_eps,
                          momentum=1.0 - spec.bn_momentum)
  bias = f"params/{path}/bias" in shapes
  if len(kernel) == 2:
    return nn.Linear(kernel[0], kernel[1], bias=bias)
  kh, kw, per_group, cout = kernel
  stride, groups, spatial = conv_configs(spec).get(path, (1, 1, False))
  if spatial and spec.padding == "same" and stride > 1:
    return SameConv2d(per_group * groups, cout, (kh, kw), stride, 0, groups=groups, bias=bias)
  return nn.Conv2d(per_group * groups, cout, (kh, kw), stride, (kh // 2, kw // 2), groups=groups,
                   bias=bias)


class TorchNetwork(nn.Module):
  """The torch counterpart of ``Network(spec)``: NCHW normalised images → the main head's logits.

  Build it with :func:`to_torch`. ``forward_all`` gives every head's logits and the pooled features.

  Attributes:
    spec: the structure (LoRA already merged; see :func:`jaxft.export.state.prepare`).
    names: jaxft module path → torch module name.
  """

  def __init__(self, spec: ModelSpec, shapes: Mapping[str, tuple[int, ...]]) -> None:
    super().__init__()
    self.spec = spec
    self.names = module_names(spec)
    for path, name in self.names.items():
      _put(self, name, _make(spec, path, shapes))

  def _mod(self, path: str) -> nn.Module:
    return self.get_submodule(self.names[path])

  def _norm(self, path: str, x: torch.Tensor) -> torch.Tensor:
    # A BN folded into its conv (spec.folded_bn) has no torch name: the conv's bias already did its work.
    return self._mod(path)(x) if path in self.names else x

  def _conv_bn(self, conv: str, bn: str, x: torch.Tensor) -> torch.Tensor:
    return self._norm(bn, self._mod(conv)(x))

  def _block(self, p: str, b: BlockSpec, x: torch.Tensor) -> torch.Tensor:
    act, cin = ACTIVATIONS[b.act], x.shape[1]
    cb = lambda conv, bn, h: self._conv_bn(f"{p}/{conv}", f"{p}/{bn}", h)
    if b.kind == "basic":
      h = cb("conv2", "bn2", act(cb("conv1", "bn1", x)))
    elif b.kind == "bottleneck":
      h = cb("conv3", "bn3", act(cb("conv2", "bn2", act(cb("conv1", "bn1", x)))))
    else:  # mbconv (module_names refused any other kind)
      h = act(cb("expand_conv", "bn0", x)) if b.width != cin else x
      h = cb("project_conv", "bn2", act(cb("depthwise_conv", "bn1", h)))
    same_shape = b.stride == 1 and cin == b.out
    if b.kind == "mbconv":
      y = h + x if same_shape else h
    else:
      if same_shape:
        sc = x
      elif self.spec.shortcut == "conv":
        sc = cb("downsample_conv", "downsample_bn", x)
      else:  # option_a: subsample, zero-pad channels
        sc = x[:, :, ::b.stride, ::b.stride] if b.stride > 1 else x
        lo = (b.out - cin) // 2
        sc = F.pad(sc, (0, 0, 0, 0, lo, b.out - cin - lo))
      y = act(h + sc)
    if b.adapter:
      y = y + self._mod(f"{p}/adapter/up")(act(self._mod(f"{p}/adapter/down")(y)))
    return y

  def forward_all(self, x: torch.Tensor) -> dict[str, object]:
    """Returns ``{'features', 'logits', 'heads'}`` as ``Network(..., return_all=True)`` does."""
    s = self.spec
    x = ACTIVATIONS[s.stem.act](self._conv_bn("stem/conv", "stem/bn", x))
    if s.stem.pool:
      x = F.max_pool2d(x, 3, 2, 1)
    for st in s.stages:
      for b in st.blocks:
        x = self._block(f"{st.name}/{b.name}", b, x)
    if s.neck_width:
      x = ACTIVATIONS[s.neck_act](self._conv_bn("neck_conv", "neck_bn", x))
    features = x.mean((2, 3))
    heads = {h.name: self._mod(head_module_name(h.name))(F.dropout(features, h.dropout, self.training))
             for h in s.heads}
    return {"features": features, "logits": heads[s.heads[0].name], "heads": heads}

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Returns the main head's ``[N, num_classes]`` logits of NCHW normalised images ``x``."""
    return self.forward_all(x)["logits"]


def to_torch(model: Model) -> TorchNetwork:
  """Returns a torch module computing ``model``'s function, in eval mode, on CPU, float32.

  LoRA adapters are merged first (:func:`jaxft.export.state.prepare`). Its ``state_dict()`` equals
  :func:`jaxft.export.torch_state_dict` (loaded with ``strict=True``); for an unmodified torchvision
  ResNet it loads into ``torchvision.models.resnetXX()`` with ``strict=True``. Input is NCHW and
  normalised like jaxft's (``model.meta['mean'/'std']``). The parameters are copies: ``model`` is never
  mutated and shares no memory with the result.

  Raises:
    ExportError: a structure without torch names, or variables that do not fit the spec.
  """
  model = prepare(model)
  sd = torch_state_dict(model)
  shapes = {p: tuple(v.shape) for p, v in paths.flatten(model.variables).items()}
  net = TorchNetwork(model.spec, shapes)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  return net.eval()
