"""BatchNorm on CPU: closed-form VJPs whose channel sums are GEMVs.

XLA:CPU splits large reductions into a slow ``reduce-window`` tree that does not fuse with the
producer, while its GEMV reads the same array several times faster (docs/benchmarks.md,
"BatchNorm"). :func:`batch_norm_train` (training mode) and :func:`channel_affine` (running statistics)
compute what the plain :class:`jaxft.models.layers.BatchNorm` computes, with every channel sum of the
forward and backward passes one :func:`channel_sum`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def channel_sum(a: jax.Array, gemv: bool) -> jax.Array:
  """Σ over all but the last axis of ``a`` (``[N, ..., C]``), in float32; ``a`` is not mutated.

  With ``gemv`` it is one GEMV per summed axis, outermost first (faster than XLA:CPU's reduction; see
  the module docstring). Summing axis by axis keeps the rounding error near that of pairwise summation
  (one GEMV over all N·H·W rows is ~10× less precise).
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
