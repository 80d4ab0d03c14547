"""One generic network module built from a :class:`~jaxft.models.spec.ModelSpec`.

Parameter paths read like the torch modules they come from (see ``docs/weights.md``):

==============================  ====================================
torch (torchvision ResNet)      jaxft
==============================  ====================================
``conv1`` / ``bn1``             ``stem/conv`` / ``stem/bn``
``layer2.0.conv1``              ``layer2/block0/conv1``
``layer2.0.bn1``                ``layer2/block0/bn1``
``layer2.0.downsample.0``      ``layer2/block0/downsample_conv``
``layer2.0.downsample.1``      ``layer2/block0/downsample_bn``
``fc``                          ``head``
==============================  ====================================

Adapters grafted by surgery live at ``<stage>/<block>/adapter/{down,up}``, extra heads at
``head_<name>``, EfficientNet's ``_conv_head``/``_bn1`` at ``neck_conv``/``neck_bn``.

A conv named in ``ModelSpec.lora`` (``layer1/block0/conv1``) has a sibling module ``<conv>_lora``
(``layer1/block0/conv1_lora``) holding ``down/kernel`` (kh×kw×cin×r, the conv's stride and padding) and
``up/kernel`` (1×1×r×cout, zero-initialised); the conv's output gains ``(alpha / r) · up(down(x))``, which
is exactly ``conv(x, W + (alpha / r) · reshape(A @ B))`` with ``A`` the down kernel viewed as
``(kh·kw·cin) × r`` and ``B`` the up kernel as ``r × cout``. With ``ModelSpec.folded_bn`` every conv
that a BatchNorm followed has a ``bias`` and the BN modules do not exist.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.models import layers as layers_lib
from jaxft.models.spec import BlockSpec, LoraSpec, ModelSpec, StemSpec

Dtype = Any


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's ``SAME`` padding of one spatial dimension (the odd pixel goes to the end)."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def padded_conv(conv: Callable[[jax.Array], jax.Array], x: jax.Array, kernel: int, stride: int,
                padding: str) -> jax.Array:
  """Applies ``conv`` (a ``Layers.conv``, which pads ``k // 2`` on each side) padded as ``padding`` says.

  ``torch`` is ``conv(x)``. ``same`` is TensorFlow's ``SAME``, which differs for strided convs: on an
  even size it pads one pixel less at the start, i.e. the windows sit one pixel later. The conv keeps its
  own padding (so its parameters and implementation are shared with every other conv); ``x`` gets enough
  leading zeros that a whole number of windows precede the wanted ones, which are then sliced out. For
  stride 2 this costs one extra output row and column.
  """
  if padding == "torch" or stride == 1:
    return conv(x)
  if padding != "same":
    raise ValueError(f"unknown padding {padding!r}; valid: torch, same")
  p = kernel // 2
  pads, windows = [(0, 0)], [slice(None)]
  for size in x.shape[1:3]:
    lo, _ = _same_pads(size, kernel, stride)
    extra = (lo - p) % stride  # leading zeros so that the conv's windows line up with SAME's
    skip = (p - lo + extra) // stride  # the conv's windows that start before SAME's first one
    pads.append((extra, 0))
    windows.append(slice(skip, skip + -(-size // stride)))
  pads.append((0, 0))
  if any(lo for lo, _ in pads):
    x = jnp.pad(x, pads)
  return conv(x)[tuple(windows) + (slice(None),)]


def bn_is_frozen(path: str, frozen_bn: Iterable[str]) -> bool:
  """Whether ``frozen_bn`` names the BatchNorm at ``path`` (``layer1/block0/bn1``, ``stem/bn``,
  ``neck_bn``): the path itself or a module above it (``layer1/block0``, ``layer1``). ``neck`` is
  accepted for ``neck_bn`` (the stage-level names of earlier versions)."""
  for name in frozen_bn:
    name = "neck_bn" if name == "neck" else name
    if path == name or path.startswith(name + "/"):
      return True
  return False


@dataclasses.dataclass(frozen=True)
class Parts:
  """What every module of a :class:`Network` is built with (one value, passed down unchanged).

  Attributes:
    bn: the BatchNorm factory, its momentum, epsilon and dtype already bound.
    layers: the layer implementations.
    dtype: compute dtype.
    padding: how strided convs pad (``ModelSpec.padding``: ``torch`` or ``same``).
    frozen_bn: ``Network.frozen_bn``.
    root: the scope path of the :class:`Network` (``()`` unless it is a submodule), so that BN paths
      read as parameter paths do.
    lora: ``ModelSpec.lora``.
    folded_bn: ``ModelSpec.folded_bn``.
  """

  bn: Callable[..., nn.Module]
  layers: layers_lib.Layers
  dtype: Dtype = jnp.float32
  padding: str = "torch"
  frozen_bn: tuple[str, ...] = ()
  root: tuple[str, ...] = ()
  lora: tuple[LoraSpec, ...] = ()
  folded_bn: bool = False

  def _path(self, owner: nn.Module, name: str) -> str:
    return "/".join((*owner.scope.path[len(self.root):], name))

  def _lora_spec(self, owner: nn.Module, name: str) -> LoraSpec | None:
    path = self._path(owner, name)
    return next((x for x in self.lora if x.module == path), None)

  def conv(self, owner: nn.Module, features: int, kernel: int, stride: int = 1, groups: int = 1, *,
           name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns ``x -> conv(x)`` for the conv ``name`` created in ``owner`` (a BN-followed conv of the
    network): with a bias when the BNs are folded, plus its LoRA update when ``lora`` names it.

    Raises:
      ValueError: LoRA on a grouped conv.
    """
    conv = self.layers.conv(features, kernel, stride, groups, use_bias=self.folded_bn,
                            dtype=self.dtype, name=name)
    spec = self._lora_spec(owner, name)
    if spec is None:
      return conv
    if groups != 1:
      raise ValueError(f"LoRA on {self._path(owner, name)}: grouped convs (groups={groups}) are not "
                       "supported; select ungrouped convs")
    lora = Lora(spec.rank, features, kernel, stride, spec.scale, self.layers, self.dtype,
                name=f"{name}_lora")
    return lambda x: conv(x) + lora(x)

  def conv_bn(self, owner: nn.Module, features: int, kernel: int, stride: int = 1, groups: int = 1,
              *, conv: str, bn: str, train: bool, act: str = "identity"
              ) -> Callable[..., jax.Array]:
    """Returns ``f(x, residual=None) = act(BN(conv(x)) [+ residual])`` for the conv ``conv`` and the
    BatchNorm ``bn`` after it, both created in ``owner`` (as :meth:`conv` and :meth:`norm` create
    them: same parameters, same values).

    In inference (not ``train``, outside init), when the layers' convs take an epilogue
    (``Layers.conv_epilogue``) and no LoRA update is added to this one, the BatchNorm's running
    affine, the residual add and the activation are handed to the conv as an
    :class:`~jaxft.models.layers.Epilogue` (the CPU backend computes them inside the convolution,
    with no pass of their own over the output) instead of being applied after it.
    """
    conv_fn = self.conv(owner, features, kernel, stride, groups, name=conv)
    activation = layers_lib.activation(act)
    fused = (self.layers.conv_epilogue and not train and not owner.is_initializing()
             and self._lora_spec(owner, conv) is None)
    if not fused:
      norm = self.norm(owner, bn, train)

      def plain(x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        if residual is None and act == "relu":
          return norm(conv_fn(x), relu=True)  # the BN's own pass applies it (CPU: no pass of its own)
        h = norm(conv_fn(x))
        return activation(h if residual is None else h + residual)

      return plain
    mul, shift = (None, None) if self.folded_bn else self.bn(name=bn).running_affine()
    return lambda x, residual=None: conv_fn(
        x, epilogue=layers_lib.Epilogue(mul, shift, residual, act))

  def norm(self, owner: nn.Module, name: str, train: bool) -> Callable[..., jax.Array]:
    """Returns ``(x, relu=False) -> BN(x)`` (``relu(BN(x))`` with ``relu``) for the BatchNorm ``name``
    created in ``owner`` (call it from ``owner``'s compact method): batch statistics, updating the
    running ones, only when ``train`` and the BN is not in ``frozen_bn``; the identity (or the ReLU)
    when the BNs are folded into the convs."""
    if self.folded_bn:
      return lambda x, relu=False: layers_lib.relu(x) if relu else x
    path = self._path(owner, name)
    use_running_average = not train or bn_is_frozen(path, self.frozen_bn)
    module = self.bn(name=name)
    return lambda x, relu=False: module(x, use_running_average, relu)


class Stem(nn.Module):
  """conv k×k/s + BN + act (+ 3×3/2 max-pool)."""

  spec: StemSpec
  parts: Parts

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s, p = self.spec, self.parts
    unit = p.conv_bn(self, s.width, s.kernel, s.stride, conv="conv", bn="bn", train=train, act=s.act)
    x = padded_conv(unit, x, s.kernel, s.stride, p.padding)
    if s.pool:
      x = p.layers.max_pool(x)
    return x


class Adapter(nn.Module):
  """Residual 1×1 bottleneck adapter ``x + up(act(down(x)))``; ``up`` starts at zero (identity map)."""

  width: int
  layers: layers_lib.Layers
  act: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.layers.conv(self.width, 1, use_bias=True, dtype=self.dtype, name="down")(x)
    h = layers_lib.activation(self.act)(h)
    h = self.layers.conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name="up",
                    kernel_init=nn.initializers.zeros)(h)
    return x + h


class Lora(nn.Module):
  """The LoRA update of a conv: ``scale · up(down(x))``, ``up`` zero-initialised (no change at creation).

  ``down`` has the conv's kernel size and stride (and is padded as the conv is, by the caller), ``up``
  is 1×1, so the sum with the conv equals one conv with kernel ``W + scale · reshape(A @ B)``.
  """

  rank: int
  features: int
  kernel: int
  stride: int
  scale: float
  layers: layers_lib.Layers
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.layers.conv(self.rank, self.kernel, self.stride, dtype=self.dtype, name="down")(x)
    h = self.layers.conv(self.features, 1, dtype=self.dtype, name="up",
                         kernel_init=nn.initializers.zeros)(h)
    return h * jnp.asarray(self.scale, h.dtype)


class Block(nn.Module):
  """A residual block of any kind in :class:`BlockSpec` (``basic``, ``bottleneck``, ``mbconv``)."""

  spec: BlockSpec
  shortcut: str
  parts: Parts

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, p = self.spec, self.parts
    cin = x.shape[-1]
    # unit(...)(h, residual) = act(bn(conv(h)) + residual), fused into the conv in inference.
    unit = functools.partial(p.conv_bn, self, train=train)
    # The strided k×k conv of every kind pads per ModelSpec.padding.
    spatial = lambda c, h: padded_conv(c, h, b.kernel, b.stride, p.padding)
    same_shape = b.stride == 1 and cin == b.out
    if b.kind in ("basic", "bottleneck"):
      if same_shape:
        sc = x
      elif self.shortcut == "conv":
        sc = unit(b.out, 1, b.stride, conv="downsample_conv", bn="downsample_bn")(x)
      elif self.shortcut == "option_a":
        sc = x[:, ::b.stride, ::b.stride, :] if b.stride > 1 else x
        lo = (b.out - cin) // 2
        sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (lo, b.out - cin - lo)))
      else:
        raise ValueError(f"unknown shortcut {self.shortcut!r}; valid: conv, option_a")
    if b.kind == "basic":
      h = spatial(unit(b.width, b.kernel, b.stride, conv="conv1", bn="bn1", act=b.act), x)
      y = unit(b.out, b.kernel, 1, conv="conv2", bn="bn2", act=b.act)(h, sc)
    elif b.kind == "bottleneck":
      h = unit(b.width, 1, conv="conv1", bn="bn1", act=b.act)(x)
      h = spatial(unit(b.width, b.kernel, b.stride, b.groups, conv="conv2", bn="bn2", act=b.act), h)
      y = unit(b.out, 1, conv="conv3", bn="bn3", act=b.act)(h, sc)
    elif b.kind == "mbconv":
      h = x
      if b.width != cin:
        h = unit(b.width, 1, conv="expand_conv", bn="bn0", act=b.act)(h)
      h = spatial(unit(b.width, b.kernel, b.stride, b.width, conv="depthwise_conv", bn="bn1",
                       act=b.act), h)
      # Inverted residuals have no projection shortcut and no activation after the add.
      y = unit(b.out, 1, conv="project_conv", bn="bn2")(h, x if same_shape else None)
    else:
      raise ValueError(f"unknown block kind {b.kind!r}; valid: basic, bottleneck, mbconv")
    if b.adapter:
      y = Adapter(b.adapter, p.layers, b.act, p.dtype, name="adapter")(y)
    return y


class Stage(nn.Module):
  """A container that names its blocks (``layer1/block0`` …)."""

  blocks: tuple[BlockSpec, ...]
  shortcut: str
  parts: Parts

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for b in self.blocks:
      x = Block(b, self.shortcut, self.parts, name=b.name)(x, train)
    return x


class Network(nn.Module):
  """A classification network built entirely from ``spec``.

  Inputs are NHWC images already normalised (see ``jaxft.data.normalize``); outputs are float32 logits.

  Attributes:
    spec: the structure.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters and BN statistics are float32.
    frozen_bn: BatchNorms that always use — and never update — their running statistics, even in
      training: BN module paths (``layer1/block0/bn1``, ``stem/bn``, ``neck_bn``) or modules above them
      (``layer1/block0``, a stage name, ``stem``; ``neck`` for ``neck_bn``), see :func:`bn_is_frozen`.
    layers: the layer implementations (:class:`~jaxft.models.layers.Layers`); they never change the
      parameter tree.
  """

  spec: ModelSpec
  dtype: Dtype = jnp.float32
  frozen_bn: tuple[str, ...] = ()
  layers: layers_lib.Layers = layers_lib.Layers()

  def _parts(self) -> Parts:
    bn = functools.partial(self.layers.norm, momentum=self.spec.bn_momentum, epsilon=self.spec.bn_eps,
                           dtype=self.dtype)
    return Parts(bn, self.layers, self.dtype, self.spec.padding, tuple(self.frozen_bn),
                 tuple(self.scope.path), tuple(self.spec.lora), self.spec.folded_bn)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_all: bool = False,
               head_dropout: Mapping[str, Any] | None = None) -> Any:
    """Runs the network.

    Args:
      x: ``[N, H, W, 3]`` normalised images.
      train: batch statistics for BN (and their running averages updated, which needs
        ``mutable=['batch_stats']``) and active dropout (needs a ``dropout`` rng).
      return_all: return a dict instead of the main logits.
      head_dropout: ``{head name: rate}`` replacing the spec's dropout rate of those heads in training;
        a rate may be a traced scalar (an adaptive rate: no recompilation when it moves).

    Returns:
      The main head's ``[N, num_classes]`` float32 logits; with ``return_all``, a dict with
      ``features`` (pooled, float32), ``logits`` (main head), ``heads`` (every head's logits by name)
      and ``stages`` (each stage's output feature map by stage name, in the compute dtype).
    """
    s = self.spec
    x = x.astype(self.dtype)
    parts = self._parts()
    x = Stem(s.stem, parts, name="stem")(x, train)
    stages = {}
    for st in s.stages:
      x = stages[st.name] = Stage(st.blocks, s.shortcut, parts, name=st.name)(x, train)
    if s.neck_width:
      x = parts.conv_bn(self, s.neck_width, 1, conv="neck_conv", bn="neck_bn", train=train,
                        act=s.neck_act)(x)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    outputs = {}
    for h in s.heads:
      f = features
      rate = h.dropout if head_dropout is None else head_dropout.get(h.name, h.dropout)
      if isinstance(rate, (int, float)):
        if rate:
          f = nn.Dropout(rate, deterministic=not train)(f)
      elif train:
        f = layers_lib.dropout(self.make_rng("dropout"), f, rate)
      outputs[h.name] = nn.Dense(h.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                 name=head_module_name(h.name))(f).astype(jnp.float32)
    main = outputs[s.heads[0].name]
    if return_all:
      return {"features": features, "logits": main, "heads": outputs, "stages": stages}
    return main


def head_module_name(head: str) -> str:
  """The module (top-level subtree) name of a head: ``head`` for the main head, else ``head_<name>``."""
  return "head" if head == "head" else f"head_{head}"
