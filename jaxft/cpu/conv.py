"""Convolutions as matrix products: the CPU convolution plans (XLA:CPU's ``lax.conv`` is slow).

XLA:CPU's convolutions are far from the machine's GEMM peak on small feature maps and in some gradient
passes on large ones (1×1 kernel gradients, stride-2 input gradients), while its dot — YNNPACK's GEMM
with :data:`jaxft.cpu.flags.CPU_XLA_FLAGS` — runs near the machine's peak (docs/benchmarks.md). So on
CPU each pass picks its formulation (:func:`jaxft.cpu.impl.resolve_impl` chooses which):

* ``onednn`` (maps of at least :data:`~jaxft.cpu.impl.ONEDNN_MIN_PIXELS` pixels, once the wrapper is
  loaded): every pass is oneDNN's direct convolution — the kernels PyTorch runs on CPU — called as an
  XLA custom call (:mod:`jaxft.cpu.onednn`). Everything else (smaller maps, other dtypes, several
  devices, oneDNN not loaded) follows this plan:
* ``matmul`` (maps of at most :data:`~jaxft.cpu.impl.SMALL_MAP_PIXELS` pixels): every pass is one 2-D
  GEMM — 1×1 convolutions directly; k×k ones over patches (symmetric padding + strided slices of the
  *live* taps concatenated along channels, which is the row order of the HWIO kernel reshaped to 2-D;
  taps that only ever read padding are dropped, so a 3×3 convolution on a 1×1 map is a 1×1 one); and
  where the map has fewer pixels than live taps (3×3 stride 1 on 2×2), one dense
  ``[H·W·Cin, Ho·Wo·Cout]`` matrix built from the kernel, 2.25× fewer FLOPs than patches.
* ``hybrid`` (larger maps): ``lax.conv`` forward; kernel gradient by ``lax.conv`` for k×k kernels and
  one GEMM for 1×1; input gradient by ``lax.conv`` at stride 1 and a GEMM folded back onto the input
  grid (k² padded adds that XLA fuses) at stride 2 (:func:`_grad_plan`). 3×3 stride-1 convolutions
  on mid-sized maps run their forward and input-gradient passes as Winograd F(2×2, 3×3)
  (:mod:`jaxft.cpu.winograd`); 1×1 kernel gradients with more than 64 input channels write the
  transposed input out for a plain GEMM (:func:`_transposed_lhs_dot`).
* depthwise convolutions: a sum of k² shifted slices times one kernel tap each (no GEMM at all);
* any other grouped convolution: ``lax.conv_general_dilated``.

The VJPs are written by hand (:func:`gemm_conv`, :func:`depthwise`) so that each pass is exactly the
chosen computation, without the transposed copies autodiff would add. Every function here computes
the same values as ``lax.conv_general_dilated``; the module :class:`jaxft.cpu.layers.Conv` wraps them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxft.cpu import onednn, winograd
from jaxft.cpu.impl import SMALL_MAP_PIXELS, resolve_impl


def _pad_hw(x: jax.Array, padding: Sequence[tuple[int, int]]) -> jax.Array:
  if all(lo == 0 and hi == 0 for lo, hi in padding):
    return x
  return jnp.pad(x, ((0, 0), *padding, (0, 0)))


def windows(xp: jax.Array, rows: tuple[int, int], cols: tuple[int, int], strides: tuple[int, int],
            out_hw: tuple[int, int]) -> list[jax.Array]:
  """The strided windows ``[N, Ho, Wo, C]`` of an already padded NHWC ``xp`` for the kernel taps
  ``rows × cols`` (``[first, last + 1)`` ranges), row-major over the taps. ``xp`` is not mutated."""
  n, _, _, c = xp.shape
  (sh, sw), (ho, wo) = strides, out_hw
  return [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1))
          for i in range(*rows) for j in range(*cols)]


def fold_windows(grads: Sequence[jax.Array], taps: Sequence[tuple[int, int]],
                 strides: tuple[int, int], padded_hw: tuple[int, int]) -> jax.Array:
  """The transpose of :func:`windows`: each ``grads[t]`` (``[N, Ho, Wo, C]``) dilated by the stride and
  placed at its tap ``taps[t] = (i, j)`` on the padded ``[N, Hp, Wp, C]`` grid, summed (k² pads and
  adds that XLA fuses into one loop)."""
  (sh, sw), (hp, wp) = strides, padded_hw
  out = None
  for g, (i, j) in zip(grads, taps):
    ho, wo = g.shape[1:3]
    g = lax.pad(g, jnp.zeros((), g.dtype),
                ((0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                 (j, wp - j - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
    out = g if out is None else out + g
  return out


def _taps(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int]
          ) -> tuple[list[jax.Array], tuple[int, int]]:
  """The k·k strided windows of an already padded NHWC ``x``, row-major over the kernel taps."""
  _, h, w, _ = x.shape
  (kh, kw), (sh, sw) = kernel_hw, strides
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  return windows(x, (0, kh), (0, kw), strides, (ho, wo)), (ho, wo)


def _shifted_sum(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """Depthwise correlation of a padded NHWC ``x`` with ``kernel [kh, kw, C]``: Σ_taps window · tap."""
  kh, kw, c = kernel.shape
  taps, _ = _taps(x, (kh, kw), strides)
  k = kernel.reshape(kh * kw, c)
  y = taps[0] * k[0]
  for t in range(1, kh * kw):
    y = y + taps[t] * k[t]
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Depthwise NHWC convolution (``kernel [kh, kw, C]``) as a sum of k² shifted products.

  XLA:CPU's depthwise ``lax.conv`` is far slower in the forward pass. The gradients are written by
  hand: autodiff of the slices would materialise k² padded copies of the output gradient, while the
  input gradient is itself a stride-1 depthwise correlation of the (dilated, padded) output gradient
  with the flipped kernel, and the kernel gradient k² fused reductions.
  """
  return _shifted_sum(_pad_hw(x, padding), kernel, strides)


def _depthwise_fwd(x, kernel, strides, padding):
  return depthwise(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, res, dy):
  x, kernel = res
  kh, kw, _ = kernel.shape
  (sh, sw), ((lh, _), (lw, _)) = strides, padding
  h, w = x.shape[1:3]
  ho, wo = dy.shape[1:3]
  # dx[q] = Σ_i dilate(dy)[q + lo - i] k[i]: a valid correlation of the dilated dy, padded by k-1-lo in
  # front, with the flipped kernel.
  dyp = lax.pad(dy, jnp.zeros((), dy.dtype),
                ((0, 0, 0), (kh - 1 - lh, h + lh - (ho - 1) * sh - 1, sh - 1),
                 (kw - 1 - lw, w + lw - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
  dx = _shifted_sum(dyp, kernel[::-1, ::-1], (1, 1))
  taps, _ = _taps(_pad_hw(x, padding), (kh, kw), strides)
  dk = jnp.stack([jnp.sum(t * dy, axis=(0, 1, 2), dtype=jnp.float32) for t in taps])
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _live_taps(size: int, k: int, stride: int, pad: tuple[int, int]) -> tuple[int, int]:
  """The range ``[first, last + 1)`` of kernel taps (along one axis) that touch the unpadded input.

  A tap that only ever reads padding contributes zeros; dropping it saves its share of the GEMM (a
  3×3 convolution on a 1×1 map is a 1×1 convolution with the centre tap; on a 2×2 map with stride 2,
  four of the nine taps). Live taps are always contiguous.
  """
  out = (size + pad[0] + pad[1] - k) // stride + 1
  live = [i for i in range(k) if any(0 <= o * stride + i - pad[0] < size for o in range(out))]
  return (live[0], live[-1] + 1) if live else (0, 1)


def _im2col(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
            padding: tuple[tuple[int, int], ...], rows: tuple[int, int], cols: tuple[int, int]
            ) -> tuple[jax.Array, tuple[int, int, int]]:
  """Patches ``[N·Ho·Wo, taps·C]`` of NHWC ``x`` over the live taps ``rows × cols`` (row-major, then
  channel: the row order of an HWIO kernel slice reshaped to 2-D), and ``(N, Ho, Wo)``."""
  n, h, w, _ = x.shape
  (kh, kw), (sh, sw) = kernel_hw, strides
  (lh, hh), (lw, hw) = padding
  ho, wo = (h + lh + hh - kh) // sh + 1, (w + lw + hw - kw) // sw + 1
  if _patches_are_input(x.shape, (ho, wo), rows, cols):
    return x.reshape(n, -1), (n, ho, wo)
  taps = windows(_pad_hw(x, padding), rows, cols, strides, (ho, wo))
  p = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return p.reshape(n * ho * wo, -1), (n, ho, wo)


def _patches_are_input(x_shape: Sequence[int], out_hw: tuple[int, int], rows: tuple[int, int],
                       cols: tuple[int, int]) -> bool:
  """Whether the patch matrix is the input itself, reshaped: one output pixel whose live taps read
  every input pixel once, in order (3×3 stride 2 on a 2×2 map) — then no copy is needed."""
  return out_hw == (1, 1) and (rows[1] - rows[0], cols[1] - cols[0]) == tuple(x_shape[1:3])


def _live(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: tuple[int, int],
          padding: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], tuple[int, int]]:
  return (_live_taps(x_shape[1], kernel_shape[0], strides[0], padding[0]),
          _live_taps(x_shape[2], kernel_shape[1], strides[1], padding[1]))


def _live_matrix(kernel: jax.Array, rows: tuple[int, int], cols: tuple[int, int]) -> jax.Array:
  """The live taps of an HWIO kernel as the ``[taps·Cin, Cout]`` matrix matching :func:`_im2col`."""
  return kernel[rows[0]:rows[1], cols[0]:cols[1]].reshape(-1, kernel.shape[-1])


def _dense_out_hw(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: tuple[int, int],
                  padding: tuple[tuple[int, int], ...]) -> tuple[int, int] | None:
  """``(Ho, Wo)`` when the map is so small that the convolution is cheaper as one dense
  ``[H·W·Cin, Ho·Wo·Cout]`` matrix than as patches (``H·W`` below the number of live taps, e.g. 3×3
  stride 1 on 2×2: 16 blocks instead of 36); else None."""
  _, h, w, _ = x_shape
  kh, kw = kernel_shape[:2]
  (sh, sw), ((lh, hh), (lw, hw)) = strides, padding
  rows, cols = _live(x_shape, kernel_shape, strides, padding)
  if h * w >= (rows[1] - rows[0]) * (cols[1] - cols[0]):
    return None
  return (h + lh + hh - kh) // sh + 1, (w + lw + hw - kw) // sw + 1


def _dense_matrix(kernel: jax.Array, in_hw: tuple[int, int], out_hw: tuple[int, int],
                  strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """The ``[H·W·Cin, Ho·Wo·Cout]`` matrix of the convolution on an ``H×W`` map. Output pixel
  ``(i, j)`` reads input ``(a, b)`` through tap ``(a - i·s + pad, b - j·s + pad)`` (zero outside the
  kernel), so its column block is one window of the kernel, zero-padded only where the window leaves
  the kernel; XLA fuses the windows into the concatenation (one pass)."""
  kh, kw, cin, cout = kernel.shape
  (h, w), (ho, wo) = in_hw, out_hw
  (sh, sw), ((lh, _), (lw, _)) = strides, padding

  def window(start: int, size: int, k: int) -> tuple[int, int, int, int]:
    lo = max(start, 0)
    hi = max(min(start + size, k), lo)  # kernel taps [lo, hi) inside the window
    return lo, hi, lo - start, size - (hi - start)

  cols = []
  for i in range(ho):
    r0, r1, rpad_lo, rpad_hi = window(lh - i * sh, h, kh)
    for j in range(wo):
      c0, c1, cpad_lo, cpad_hi = window(lw - j * sw, w, kw)
      blk = kernel[r0:r1, c0:c1]
      if rpad_lo or rpad_hi or cpad_lo or cpad_hi:
        blk = jnp.pad(blk, ((rpad_lo, rpad_hi), (cpad_lo, cpad_hi), (0, 0), (0, 0)))
      cols.append(blk.reshape(h * w * cin, cout))
  return jnp.concatenate(cols, axis=1)


def _mm(a: jax.Array, b: jax.Array, dtype=None, *, trans_a: bool = False,
        trans_b: bool = False) -> jax.Array:
  """``op(a) @ op(b)`` (``op`` transposes when asked), accumulated in float32 and returned as
  ``dtype`` (default: ``a``'s): oneDNN's matmul for bfloat16 where it runs
  (:func:`jaxft.cpu.onednn.matmul_supported`; ~1.4x XLA:CPU's bfloat16 dot, docs/benchmarks.md
  "bfloat16"), else XLA's dot. Inputs are not mutated."""
  dtype = a.dtype if dtype is None else dtype
  if onednn.matmul_supported(a.dtype) and a.dtype == b.dtype:
    return onednn.matmul(a, b, dtype, trans_a=trans_a, trans_b=trans_b)
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def gemm_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], ...], lax_forward: bool = False) -> jax.Array:
  """Dense NHWC × HWIO convolution as 2-D GEMMs (see the module docstring); ``lax_forward`` is the
  ``hybrid`` implementation. Same values as ``lax.conv``; neither input is mutated.

  The VJP is written by hand: GEMM passes are single 2-D GEMMs with no transposed copies — the kernel
  gradient ``patchesᵀ · dy`` (patches recomputed, not stored: k² times the input would dominate the
  memory of a 224 px step), the input gradient ``dy · Wᵀ`` folded back onto the input grid by k²
  padded adds that XLA fuses into one loop; ``lax`` passes are XLA's own convolution gradients.
  """
  if lax_forward:
    if winograd.use_winograd(x, kernel.shape, strides, padding):
      return winograd.winograd_3x3(x, kernel.astype(x.dtype))
    return _lax_conv(x, kernel.astype(x.dtype), strides, padding)
  out_hw = _dense_out_hw(x.shape, kernel.shape, strides, padding)
  if out_hw is not None:
    n = x.shape[0]
    big = _dense_matrix(kernel.astype(x.dtype), x.shape[1:3], out_hw, strides, padding)
    return _mm(x.reshape(n, -1), big).reshape(n, *out_hw, -1)
  rows, cols = _live(x.shape, kernel.shape, strides, padding)
  p, (n, ho, wo) = _im2col(x, kernel.shape[:2], strides, padding, rows, cols)
  return _mm(p, _live_matrix(kernel, rows, cols).astype(p.dtype)).reshape(n, ho, wo, -1)


def _fusion_barrier(x: jax.Array, witness: jax.Array) -> jax.Array:
  """``x`` itself, passed through a ``lax.cond`` so that XLA cannot fuse ``x``'s producers into its
  consumers. ``x`` is not mutated.

  XLA:CPU fuses cheap element-wise producers into every consumer, so the transposed copies that feed
  its kernel-gradient convolutions recompute a saved activation's BatchNorm + residual add + ReLU
  chain — back through several blocks — instead of reading the tensor the forward pass already wrote
  (most of a CIFAR ResNet-56 training step; docs/benchmarks.md). ``lax.optimization_barrier`` does
  not stop that (XLA:CPU still fused the producers into those copies; it does keep a transpose from
  being folded into a dot, which :func:`_transposed_lhs_dot` uses); a conditional is a fusion boundary
  that stays.
  Its predicate ``w == w or w != w`` (on one element of ``witness``) is true for every value, NaN
  included, but XLA does not fold it; the other branch (zeros, needed so that XLA does not merge
  identical branches) is never taken.
  """
  w = witness.reshape(-1)[0]
  return lax.cond((w == w) | (w != w), lambda v: v, jnp.zeros_like, x)


def _gemm_conv_fwd(x, kernel, strides, padding, lax_forward):
  # hybrid: XLA's own kernel-gradient convolution reads x, so keep it from recomputing x's producers
  # (on the GEMM path the barrier would only add a copy; docs/benchmarks.md).
  saved = _fusion_barrier(x, kernel) if lax_forward else x
  return gemm_conv(x, kernel, strides, padding, lax_forward), (saved, kernel)


def _grad_plan(kernel_hw: tuple[int, int], strides: tuple[int, int], lax_forward: bool
               ) -> tuple[str, str]:
  """How the ``hybrid`` implementation computes (kernel gradient, input gradient) on large maps.

  XLA's own kernel-gradient convolution is fast for k×k kernels but slow for 1×1 ones (where one GEMM
  needs no patches); its input gradient is fast at stride 1 but slow at stride 2 (a dilated
  convolution). The patch GEMMs lose on large maps, where k²-times larger patch matrices cost more
  memory traffic than they save. Everything else uses GEMMs. Per-pass rates: docs/benchmarks.md.
  """
  if not lax_forward:
    return "gemm", "gemm"
  return ("gemm" if kernel_hw == (1, 1) else "lax"), ("lax" if strides == (1, 1) else "gemm")


_TRANSPOSE_MIN_COLS = 65  # see _transposed_lhs_dot


def _transposed_lhs_dot(a: jax.Array, b: jax.Array, write_transpose: bool) -> jax.Array:
  """``aᵀ · b`` in float32 for ``a [K, M]``, ``b [K, N]`` (the kernel gradient ``patchesᵀ · dy``).

  ``write_transpose`` allows writing ``aᵀ`` out (below); only where ``a`` is materialised already —
  elsewhere XLA would fuse ``a``'s producers into that copy and recompute them in transposed order
  (a loss when applied to every kernel gradient).

  XLA:CPU hands a dot with a transposed left operand to Eigen (YNNPACK takes only row-major ones),
  which runs these long-K products slowly. For ``M`` > 64 it pays to write ``aᵀ`` out and give
  YNNPACK a plain GEMM (docs/benchmarks.md, "Fourth session"). The optimization barrier keeps XLA
  from folding the transpose back into the dot (in the
  compiled HLO the transpose stays a copy fusion feeding YNNPACK's GEMM; without the barrier the dot
  reads ``a`` with its contracting dimension first and goes to Eigen).
  Inputs are not mutated.
  """
  if not write_transpose or a.shape[1] < _TRANSPOSE_MIN_COLS:
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return lax.dot(lax.optimization_barrier(a.T), b, preferred_element_type=jnp.float32)


def _gemm_conv_bwd(strides, padding, lax_forward, res, dy):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  out_hw = _dense_out_hw(x.shape, kernel.shape, strides, padding)
  if out_hw is not None and not lax_forward:
    dy2 = dy.reshape(n, -1)
    big, fold = jax.vjp(lambda k: _dense_matrix(k, (h, w), out_hw, strides, padding),
                        kernel.astype(jnp.float32))
    dbig = _mm(x.reshape(n, -1), dy2, jnp.float32, trans_a=True)
    dx = _mm(dy2, big.astype(dy.dtype), trans_b=True)
    return dx.reshape(x.shape).astype(x.dtype), fold(dbig)[0].astype(kernel.dtype)
  plan_dw, plan_dx = _grad_plan((kh, kw), strides, lax_forward)
  (lh, hh), (lw, hw) = padding
  rows, cols = _live(x.shape, kernel.shape, strides, padding)
  conv_of = lambda x, k: _lax_conv(x, k.astype(x.dtype), strides, padding)
  if plan_dw == "lax":
    dw = jax.vjp(lambda k: conv_of(x, k), kernel)[1](dy)[0]
  else:
    p, _ = _im2col(x, (kh, kw), strides, padding, rows, cols)
    # hybrid 1×1: p is the saved input (or its strided slice), materialised behind the fusion barrier.
    if onednn.matmul_supported(p.dtype):
      dwl = _mm(p, dy.reshape(-1, cout).astype(p.dtype), jnp.float32, trans_a=True)
    else:
      dwl = _transposed_lhs_dot(p, dy.reshape(-1, cout),
                                write_transpose=lax_forward and (kh, kw) == (1, 1))
    dw = jnp.pad(dwl.reshape(rows[1] - rows[0], cols[1] - cols[0], cin, cout),
                 ((rows[0], kh - rows[1]), (cols[0], kw - cols[1]), (0, 0), (0, 0)))
  if plan_dx == "lax":
    if winograd.use_winograd(dy, kernel.shape, strides, padding):
      # The input gradient of a 3×3 'same' convolution is the same convolution of dy with the kernel
      # flipped in space and transposed in channels.
      flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
      dx = winograd.winograd_3x3(dy, flipped.astype(dy.dtype))
    else:
      dx = jax.vjp(lambda x: conv_of(x, kernel), x)[1](dy)[0]
    return dx.astype(x.dtype), dw.astype(kernel.dtype)
  ho, wo = dy.shape[1:3]
  wm = _live_matrix(kernel, rows, cols).astype(dy.dtype)
  dp = _mm(dy.reshape(-1, cout), wm, trans_b=True)  # [N·Ho·Wo, taps·Cin]
  if _patches_are_input(x.shape, (ho, wo), rows, cols):
    dx = dp.reshape(x.shape)
  else:
    taps = [(i, j) for i in range(*rows) for j in range(*cols)]
    dp = dp.reshape(n, ho, wo, len(taps), cin)
    dxp = fold_windows([dp[:, :, :, t, :] for t in range(len(taps))], taps, strides,
                       (h + lh + hh, w + lw + hw))
    dx = dxp[:, lh:lh + h, lw:lw + w, :]
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def _lax_conv(x, kernel, strides, padding, groups=1):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


def conv_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
                padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)), groups: int = 1,
                lax_forward: bool = False) -> jax.Array:
  """NHWC × HWIO convolution computed as one GEMM (or shifted products when depthwise).

  ``lax_forward`` computes the forward pass of a dense convolution with ``lax.conv`` and plans the
  gradients per pass (the ``hybrid`` implementation). Same result as
  ``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  feature_group_count=groups)``; grouped convolutions that are not depthwise (channel
  multiplier 1) are computed by exactly that call. Neither input is mutated.
  """
  kh, kw, cin_g, cout = kernel.shape
  cin = x.shape[-1]
  strides = tuple(strides)
  padding = tuple(tuple(p) for p in padding)
  if groups != 1 and not (groups == cin == cout and cin_g == 1):
    return _lax_conv(x, kernel, strides, padding, groups)
  if groups != 1:
    return depthwise(x, kernel.reshape(kh, kw, cout), strides, padding)
  return gemm_conv(x, kernel, strides, padding, lax_forward)


def convolve(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             padding: Sequence[tuple[int, int]], groups: int = 1, impl: str = "auto") -> jax.Array:
  """NHWC × HWIO convolution (no dilation) computed by ``impl`` in ``x``'s type, resolved by
  :func:`resolve_impl` for this input (nothing is built). Same values as
  ``lax.conv_general_dilated(x, kernel.astype(x.dtype), ...)`` with ``feature_group_count=groups``
  (to rounding); neither input is mutated.

  ``kernel`` may be a float32 master kernel of a bfloat16 ``x``: oneDNN then converts it inside its
  weights reorder and returns a float32 kernel gradient (accumulated in float32); every other path
  casts it first. ``onednn`` for a convolution oneDNN cannot compute (not float32 or bfloat16 with
  the CPU's bfloat16 instructions, several devices) runs ``hybrid`` (or ``matmul`` on small maps and
  for depthwise convolutions) instead.

  Raises:
    jaxft.cpu.onednn.OneDNNUnavailableError: for ``onednn`` when the oneDNN wrapper is not loaded.
  """
  strides = tuple(strides)
  padding = tuple(tuple(p) for p in padding)
  pixels = x.shape[1] * x.shape[2]
  depthwise = groups > 1 and groups == x.shape[-1] == kernel.shape[-1]
  impl = resolve_impl(impl, pixels, depthwise, grouped=groups > 1 and not depthwise)
  if impl != "onednn":
    kernel = kernel.astype(x.dtype)
  if impl == "lax":
    return _lax_conv(x, kernel, strides, padding, groups)
  if impl == "onednn":
    if onednn.supported(x.shape, kernel.shape, x.dtype, strides, padding, groups):
      if kernel.dtype != jnp.float32:
        kernel = kernel.astype(x.dtype)
      return onednn.conv(x, kernel, strides, padding, groups)
    if not onednn.loaded():
      raise onednn.OneDNNUnavailableError(f"conv impl 'onednn' but oneDNN is {onednn.status()}")
    impl = "hybrid" if pixels > SMALL_MAP_PIXELS and not depthwise else "matmul"
    kernel = kernel.astype(x.dtype)
  return conv_matmul(x, kernel, strides, padding, groups, lax_forward=impl == "hybrid")


