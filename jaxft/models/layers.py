"""Layers with PyTorch-equivalent numerics: symmetric padding, torch-style BatchNorm statistics."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxft.models import conv as conv_lib

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
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
         kernel_init: Callable[..., jax.Array] = conv_init, impl: str = "auto") -> nn.Conv:
  """A k×k conv padded symmetrically by ``k // 2`` on each side, as torch's ``padding=k//2``.

  Flax's ``padding='SAME'`` pads asymmetrically for stride 2 and gives different results from torch.
  Parameters are float32; ``dtype`` is the compute dtype. ``impl`` picks the computation (see
  ``jaxft.models.conv``: ``auto`` is oneDNN or matrix products on CPU, ``lax.conv`` elsewhere); the parameter
  tree is the same for every ``impl``.
  """
  p = kernel // 2
  return conv_lib.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                       feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                       param_dtype=jnp.float32, kernel_init=kernel_init, impl=impl, name=name)


def max_pool_3x3_s2(x: jax.Array, impl: str = "auto") -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)``: symmetric padding with -inf.

  ``impl`` follows the convolutions' choice (``jaxft.models.conv.resolve_impl``): ``lax`` is
  ``nn.max_pool``; ``matmul`` (CPU) is the maximum of nine strided slices with a hand-written VJP,
  because XLA:CPU's select-and-scatter gradient of ``reduce_window`` is slow. Both send each output's
  gradient to the first maximal input of its window, as torch does.
  """
  if conv_lib.resolve_impl(impl) == "lax":
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return _max_pool(x, 3, 2, 1)


def _pool_taps(x: jax.Array, k: int, s: int, p: int) -> tuple[list[jax.Array], tuple[int, int]]:
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
  _, h, w, _ = xp.shape
  out_hw = ((h - k) // s + 1, (w - k) // s + 1)
  return conv_lib.windows(xp, (0, k), (0, k), (s, s), out_hw), out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
  taps, _ = _pool_taps(x, k, s, p)
  return functools.reduce(jnp.maximum, taps)


def _max_pool_fwd(x, k, s, p):
  return _max_pool(x, k, s, p), x


def _max_pool_bwd(k, s, p, x, dy):
  taps, _ = _pool_taps(x, k, s, p)
  y = functools.reduce(jnp.maximum, taps)
  first = jnp.full(y.shape, k * k, jnp.int8)  # index of the first maximal tap: torch's argmax
  for t in reversed(range(k * k)):
    first = jnp.where(taps[t] == y, jnp.int8(t), first)
  zero = jnp.zeros((), dy.dtype)
  _, h, w, _ = x.shape
  dxp = conv_lib.fold_windows([jnp.where(first == t, dy, zero) for t in range(k * k)],
                              [divmod(t, k) for t in range(k * k)], (s, s), (h + 2 * p, w + 2 * p))
  return (dxp[:, p:p + h, p:p + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def channel_sum(a: jax.Array, gemv: bool) -> jax.Array:
  """Σ over all but the last axis of ``a`` (``[N, ..., C]``), in float32; ``a`` is not mutated.

  With ``gemv`` it is one GEMV per summed axis, outermost first: XLA:CPU splits large reductions into
  a slow ``reduce-window`` tree that does not fuse with the producer (2.3 ms for a 128×8×8×256 batch),
  while its GEMV reads the same array in 0.14 ms. Summing axis by axis keeps the rounding error near
  that of pairwise summation (one GEMV over all N·H·W rows is ~10× less precise).
  """
  c = a.shape[-1]
  if not gemv:
    return jnp.sum(a.reshape(-1, c), 0, dtype=jnp.float32)
  axes = [k for k in a.shape[:-1] if k > 1]
  if len(axes) > 2 and axes[1] * axes[2] <= 1024:  # e.g. [N, H·W]: two stages are precise enough
    axes = [axes[0], axes[1] * axes[2], *axes[3:]]
  for k in axes:
    ones = jnp.ones((1, k), a.dtype)
    a = lax.dot(ones, a.reshape(k, -1), preferred_element_type=jnp.float32)[0]
  return a.reshape(c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, gemv: bool
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over the last axis: ``(y, batch mean, biased batch variance)``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` in float32. Two-pass statistics; the VJP is
  the closed form (two channel sums of the output gradient), with every channel sum a GEMV when
  ``gemv`` (CPU). Gradients also flow through the returned mean and variance.
  """
  return _bn_train_fwd(x, scale, bias, epsilon, gemv)[0]


def _bn_train_fwd(x, scale, bias, epsilon, gemv):
  xf = x.astype(jnp.float32)
  m = x.size // x.shape[-1]
  mean = channel_sum(xf, gemv) / m
  d = xf - mean
  var = channel_sum(d * d, gemv) / m
  rstd = lax.rsqrt(var + epsilon)
  y = d * (rstd * scale) + bias
  return (y, mean, var), (x, scale, mean, rstd)


def _bn_train_bwd(epsilon, gemv, res, cts):
  del epsilon
  x, scale, mean, rstd = res
  dy, dmean, dvar = cts
  xf = x.astype(jnp.float32)
  dyf = dy.astype(jnp.float32)
  m = x.size // x.shape[-1]
  xhat = (xf - mean) * rstd
  dbias = channel_sum(dyf, gemv)
  dscale = channel_sum(dyf * xhat, gemv)
  dx = ((scale * rstd) * (dyf - dbias / m - xhat * (dscale / m))
        + dmean / m + (2.0 * dvar / m) * (xf - mean))
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def channel_affine(x: jax.Array, mul: jax.Array, shift: jax.Array, gemv: bool) -> jax.Array:
  """``x * mul + shift`` per channel (last axis) in float32; the VJP's channel sums are GEMVs when
  ``gemv``. BatchNorm with running statistics is this with ``mul = scale / sqrt(var + eps)``."""
  return x.astype(jnp.float32) * mul + shift


def _affine_fwd(x, mul, shift, gemv):
  return channel_affine(x, mul, shift, gemv), (x, mul)


def _affine_bwd(gemv, res, dy):
  x, mul = res
  dyf = dy.astype(jnp.float32)
  dmul = channel_sum(dyf * x.astype(jnp.float32), gemv)
  return (dy * mul).astype(x.dtype), dmul, channel_sum(dyf, gemv)


channel_affine.defvjp(_affine_fwd, _affine_bwd)


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
    impl: ``auto``, ``lax`` or ``matmul``, resolved as the convolutions' (``jaxft.models.conv``):
      ``lax`` is plain jnp with autodiff; ``matmul`` (CPU) is :func:`batch_norm_train` /
      :func:`channel_affine` with channel sums as GEMVs. Same values and gradients.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    impl = conv_lib.resolve_impl(self.impl)
    gemv = impl != "lax"
    if use_running_average:
      mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
      if impl == "lax":
        y = x.astype(jnp.float32) * mul + (bias - ra_mean.value * mul)
      else:
        y = channel_affine(x, mul, bias - ra_mean.value * mul, gemv)
      return y.astype(self.dtype)
    if impl == "lax":
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      mul = scale * lax.rsqrt(var + self.epsilon)
      y = xf * mul + (bias - mean * mul)
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, gemv)
    if not self.is_initializing():
      n = x.size // c
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
      ra_var.value = m * ra_var.value + (1.0 - m) * var * (n / max(n - 1, 1))
    return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layer factories a :class:`~jaxft.models.network.Network` is built from (flax-examples style).

  Every implementation must produce the same parameter tree and the same values; only the computation
  differs. The defaults are plain flax/lax layers (what GPU/TPU run); ``jaxft.cpu.network_layers()``
  supplies the CPU backend's.

  Attributes:
    conv: ``conv(features, kernel, stride=1, groups=1, *, use_bias, dtype, name, kernel_init)`` → a
      module applying a k×k conv padded ``k // 2`` on each side.
    norm: a BatchNorm module class with :class:`BatchNorm`'s attributes and call signature.
    max_pool: ``max_pool(x)``, torch's ``MaxPool2d(3, stride=2, padding=1)``.
  """

  conv: Callable[..., nn.Module] = conv
  norm: Callable[..., nn.Module] = BatchNorm
  max_pool: Callable[[jax.Array], jax.Array] = max_pool_3x3_s2
