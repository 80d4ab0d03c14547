"""torch's max-pool on CPU: the maximum of strided slices with a hand-written VJP.

XLA:CPU's select-and-scatter gradient of ``reduce_window`` is slow (docs/benchmarks.md, "Max-pool").
The VJP sends each output's gradient to the first maximal input of its window, as torch does (and as
``nn.max_pool``'s autodiff does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxft.cpu.conv import fold_windows, windows


def _pool_taps(x: jax.Array, k: int, s: int, p: int) -> tuple[list[jax.Array], tuple[int, int]]:
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
  _, h, w, _ = xp.shape
  out_hw = ((h - k) // s + 1, (w - k) // s + 1)
  return windows(xp, (0, k), (0, k), (s, s), out_hw), out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
  """k×k max-pool of NHWC ``x`` with stride ``s``, padded ``p`` on each side with -inf (torch's
  ``MaxPool2d(k, s, p)``). Returns a new array; ``x`` is not mutated."""
  taps, _ = _pool_taps(x, k, s, p)
  return functools.reduce(jnp.maximum, taps)


def _max_pool_fwd(x, k, s, p):
  return max_pool(x, k, s, p), x


def _max_pool_bwd(k, s, p, x, dy):
  # In float32 whatever x's type: XLA:CPU's fused loop over bfloat16 taps is ~16x slower than over
  # float32 ones (docs/benchmarks.md, "bfloat16"); the maximum and the gradient are exact either way.
  dtype = x.dtype
  x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
  taps, _ = _pool_taps(x, k, s, p)
  y = functools.reduce(jnp.maximum, taps)
  first = jnp.full(y.shape, k * k, jnp.int8)  # index of the first maximal tap: torch's argmax
  for t in reversed(range(k * k)):
    first = jnp.where(taps[t] == y, jnp.int8(t), first)
  zero = jnp.zeros((), dy.dtype)
  _, h, w, _ = x.shape
  dxp = fold_windows([jnp.where(first == t, dy, zero) for t in range(k * k)],
                              [divmod(t, k) for t in range(k * k)], (s, s), (h + 2 * p, w + 2 * p))
  return (dxp[:, p:p + h, p:p + w, :].astype(dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
