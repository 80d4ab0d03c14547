"""Plain flax/lax layers with PyTorch-equivalent numerics: symmetric padding, torch-style BatchNorm.

These are what a :class:`~jaxft.models.network.Network` is built from by default (and what GPU/TPU
run); :class:`Layers` bundles them. A backend may supply its own implementations with the same
parameters and values (``jaxft.cpu.network_layers()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
  """``max(x, 0)``, as ``flax.linen.relu``, with the derivative read off the output (``y > 0``).

  Same values and gradients as ``nn.relu`` (its mask is ``x > 0``), but the backward pass keeps only the
  output alive, which the next layer holds anyway. In a residual block ``relu(h + shortcut)`` the sum
  then has no other reader and XLA computes add and ReLU in one pass over memory instead of two
  (docs/benchmarks.md, "ReLU's derivative from its output").
  """
  return jnp.maximum(x, 0)


relu.defjvps(lambda g, y, x: lax.select(y > 0, g, lax.full_like(g, 0)))
relu_fn = relu  # under another name where ``relu`` is a flag

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": relu,
    "relu6": nn.relu6,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
    "hard_swish": nn.hard_swish,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called ``name``; raises ``ValueError`` listing the valid names."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, groups: int = 1, *, use_bias: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None,
         kernel_init: Callable[..., jax.Array] = conv_init,
         module: Callable[..., nn.Conv] = nn.Conv) -> nn.Conv:
  """A k×k conv padded symmetrically by ``k // 2`` on each side, as torch's ``padding=k//2``.

  Flax's ``padding='SAME'`` pads asymmetrically for stride 2 and gives different results from torch.
  Parameters are float32; ``dtype`` is the compute dtype. ``module`` is the ``nn.Conv`` class to build
  (a subclass with the same parameters computes the same thing another way).
  """
  p = kernel // 2
  return module(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                feature_group_count=groups, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=kernel_init, name=name)


def dropout(key: jax.Array, x: jax.Array, rate: Any) -> jax.Array:
  """Inverted dropout whose ``rate`` (in ``[0, 1)``) may be a traced value, e.g. an adaptive rate that
  moves during training with no recompilation (``flax.linen.Dropout`` needs a static rate: it tests
  ``rate == 0`` in Python). Keeps each element with probability ``1 - rate`` and scales it by
  ``1 / (1 - rate)``; returns a new array."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(key, keep, x.shape)
  return lax.select(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)`` of NHWC ``x``: symmetric padding with -inf.

  The gradient goes to the first maximal input of each window, as torch's does.
  """
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _running_affine(scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array,
                    epsilon: float) -> tuple[jax.Array, jax.Array]:
  mul = scale * lax.rsqrt(var + epsilon)
  return mul, bias - mean * mul


class BatchNorm(nn.Module):
  """BatchNorm over NHWC with PyTorch's semantics.

  Normalises with the biased batch variance, but updates the running variance with the *unbiased*
  estimate (n / (n - 1)), exactly as ``torch.nn.BatchNorm2d`` does; flax's own ``BatchNorm`` uses the
  biased one, which differs by a factor 2 on a 1×1 map with batch 2. Statistics are computed in float32
  whatever the compute dtype.

  Attributes:
    momentum: flax convention, ``running = momentum * running + (1 - momentum) * batch``
      (torch's ``momentum=0.1`` is 0.9 here).
    epsilon: added to the variance.
    dtype: compute dtype of the output.
    scale_init: initialiser of ``scale`` (zeros makes a residual branch start as the identity).
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool, relu: bool = False) -> jax.Array:
    """Returns BN(x), or ``relu(BN(x))`` when ``relu`` (a backend may then apply the ReLU inside its
    own pass), in ``dtype``; updates the running statistics when training. ``x`` is not mutated."""
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if use_running_average:
      mul, shift = _running_affine(scale, bias, ra_mean.value, ra_var.value, self.epsilon)
      y = self.affine(x, mul, shift)
      return (relu_fn(y) if relu else y).astype(self.dtype)
    y, mean, var = self.normalize(x, scale, bias, relu)
    if not self.is_initializing():
      n = x.size // c
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
      ra_var.value = m * ra_var.value + (1.0 - m) * var * (n / max(n - 1, 1))
    return y.astype(self.dtype)

  def running_affine(self) -> tuple[jax.Array, jax.Array]:
    """Returns ``(mul, shift)``, float32 ``[C]``: this BatchNorm with its running statistics is
    ``x * mul + shift`` per channel. Reads the existing variables (apply, not init: it creates
    none), so that the affine can be fused into the convolution before it
    (:class:`Epilogue`)."""
    return _running_affine(self.get_variable("params", "scale"), self.get_variable("params", "bias"),
                           self.get_variable("batch_stats", "mean"),
                           self.get_variable("batch_stats", "var"), self.epsilon)

  def affine(self, x: jax.Array, mul: jax.Array, shift: jax.Array) -> jax.Array:
    """Returns ``x * mul + shift`` per channel (last axis) in float32: BatchNorm with running
    statistics. ``x`` is not mutated."""
    return x.astype(jnp.float32) * mul + shift

  def normalize(self, x: jax.Array, scale: jax.Array, bias: jax.Array, relu: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns training-mode ``(y, batch mean, biased batch variance)`` over the last axis, in
    float32 (two-pass statistics), ``y`` passed through a ReLU when ``relu``. ``x`` is not
    mutated."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - mean), axes)
    mul = scale * lax.rsqrt(var + self.epsilon)
    y = xf * mul + (bias - mean * mul)
    return (relu_fn(y) if relu else y), mean, var


@dataclasses.dataclass(frozen=True)
class Epilogue:
  """What an inference step does to a convolution's output ``y`` right after it, per output channel:
  ``act(y * mul + shift + residual)``, computed in float32 and rounded once to ``y``'s type.

  That is a BatchNorm with running statistics (:meth:`BatchNorm.running_affine`), the residual add
  of a block and its activation. A conv module that takes ``epilogue=`` (``Layers.conv_epilogue``)
  may compute it inside the convolution (the CPU backend's oneDNN post-ops); :meth:`apply` is the
  reference.

  Attributes:
    mul: float32 ``[C]``, or None for ones.
    shift: float32 ``[C]``, or None for zeros.
    residual: an array of ``y``'s shape, or None.
    act: a name in :data:`ACTIVATIONS`.
  """

  mul: jax.Array | None = None
  shift: jax.Array | None = None
  residual: jax.Array | None = None
  act: str = "identity"

  def with_bias(self, bias: jax.Array | None) -> "Epilogue":
    """Returns the epilogue of ``y + bias`` (a conv's own bias, applied before this one)."""
    if bias is None:
      return self
    bias = bias.astype(jnp.float32)
    shift = bias if self.mul is None else bias * self.mul
    return dataclasses.replace(self, shift=shift if self.shift is None else shift + self.shift)

  def apply(self, y: jax.Array) -> jax.Array:
    """Returns the epilogue applied to ``y``, in ``y``'s type; ``y`` is not mutated."""
    z = y.astype(jnp.float32)
    if self.mul is not None:
      z = z * self.mul
    if self.shift is not None:
      z = z + self.shift
    if self.residual is not None:
      z = z + self.residual.astype(jnp.float32)
    return activation(self.act)(z).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layer factories a :class:`~jaxft.models.network.Network` is built from (flax-examples style).

  Every implementation must produce the same parameter tree and the same values; only the computation
  differs. The defaults are the plain flax/lax layers above (what GPU/TPU run).

  Attributes:
    conv: ``conv(features, kernel, stride=1, groups=1, *, use_bias, dtype, name, kernel_init)`` → a
      module applying a k×k conv padded ``k // 2`` on each side.
    norm: a BatchNorm module class with :class:`BatchNorm`'s attributes and call signature
      ``(x, use_running_average, relu=False)`` (``relu``: return ``relu(BN(x))``; a network passes it
      for every BatchNorm followed directly by a ReLU).
    max_pool: ``max_pool(x)``, torch's ``MaxPool2d(3, stride=2, padding=1)``.
    conv_epilogue: whether the modules ``conv`` builds take ``epilogue=`` (an :class:`Epilogue`) in
      their call; a network then hands them the BatchNorm, residual add and activation that follow
      each conv in inference instead of applying those itself.
  """

  conv: Callable[..., nn.Module] = conv
  norm: Callable[..., nn.Module] = BatchNorm
  max_pool: Callable[[jax.Array], jax.Array] = max_pool_3x3_s2
  conv_epilogue: bool = False
