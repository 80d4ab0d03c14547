"""Winograd F(2×2, 3×3): the hybrid plan's 3×3 stride-1 convolutions on mid-sized maps."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# 3×3 stride-1 convolutions on maps of this many rows and columns (inclusive) run their forward and
# input-gradient passes as Winograd F(2×2, 3×3) in the hybrid implementation (see :func:`winograd_3x3`).
WINOGRAD_MAP_SIZES = (12, 32)


def use_winograd(x: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...]) -> bool:
  """Whether the hybrid plan computes this convolution (NHWC ``x``, HWIO kernel) by Winograd."""
  lo, hi = WINOGRAD_MAP_SIZES
  return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and x.dtype == jnp.float32
          and lo <= x.shape[1] <= hi and lo <= x.shape[2] <= hi)


# Winograd F(2×2, 3×3) kernel transform G (Lavin & Gray, 2016); the input and output transforms
# Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]] and Aᵀ = [[1,1,1,0],[0,1,-1,-1]] are written out
# as additions in winograd_3x3.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3×3 stride-1 'same' convolution (padding 1) of NHWC ``x`` with HWIO ``kernel`` by Winograd
  F(2×2, 3×3): 2.25× fewer multiplications than the direct convolution, as one batched GEMM of 16 ×
  ``[tiles, Cin] · [Cin, Cout]`` between additions-only transforms of 4×4 input tiles (strided slices
  that XLA fuses) and of the 2×2 output tiles. Same values as ``lax.conv`` to float32 rounding
  (relative error ~1e-6); neither input is mutated. It wins on mid-sized maps only (hence
  :data:`WINOGRAD_MAP_SIZES`; the timings are in docs/benchmarks.md, "Fourth session").
  """
  n, h, w, c = x.shape
  co = kernel.shape[-1]
  th, tw = (h + 1) // 2, (w + 1) // 2
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  r = [xp[:, i:i + 2 * th:2] for i in range(4)]
  t = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]
  v = []
  for ta in t:
    cc = [ta[:, :, j:j + 2 * tw:2] for j in range(4)]
    v += [cc[0] - cc[2], cc[1] + cc[2], cc[2] - cc[1], cc[1] - cc[3]]
  v = jnp.stack(v, 0).reshape(16, n * th * tw, c)
  g = jnp.asarray(_G, jnp.float32)
  u = jnp.einsum("ai,ijco,bj->abco", g, kernel.astype(jnp.float32), g).reshape(16, c, co)
  m = lax.dot_general(v, u.astype(v.dtype), (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, n, th, tw, co)
  pr = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
  y = [[pa[0] + pa[1] + pa[2], pa[1] - pa[2] - pa[3]] for pa in pr]
  y = jnp.stack([jnp.stack(ya, 3) for ya in y], 2)
  return y.reshape(n, 2 * th, 2 * tw, co)[:, :h, :w]

