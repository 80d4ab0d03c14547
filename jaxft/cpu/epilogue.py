"""A convolution and what an inference step does right after it, computed as one oneDNN call.

In an inference step of a ResNet every convolution is followed by a BatchNorm with running
statistics (a per-channel ``x * mul + shift``), often a residual add, and an activation. XLA:CPU
fuses those into one loop, but that loop is a separate pass over the convolution's output: read it,
write it again — memory-bound, a large share of a bfloat16 eval step once the convolutions are
oneDNN's (docs/benchmarks.md, "bfloat16"). oneDNN applies them as *post-ops* of the convolution,
to the float32 accumulators before the one rounding to the output type, with no pass of their own.

:func:`conv_epilogue` is that fused computation for a :class:`jaxft.models.layers.Epilogue`, with a
VJP (recomputing the unfused forward) so that it stays differentiable; :class:`jaxft.cpu.layers.Conv`
calls it when a network hands its conv an epilogue (inference, ``Layers.conv_epilogue``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxft.cpu import onednn
from jaxft.models.layers import Epilogue


def fusable(epilogue: Epilogue) -> bool:
  """Whether oneDNN's post-ops compute this epilogue faster than XLA's pass after the convolution:
  its activation is one of :data:`jaxft.cpu.onednn.EPILOGUE_ACTS` and, for a residual, the CPU
  fuses residuals (:func:`fuses_residuals`)."""
  return epilogue.act in onednn.EPILOGUE_ACTS and (epilogue.residual is None or fuses_residuals())


def fuses_residuals() -> bool:
  """Whether a residual add is handed to oneDNN: on CPUs with AVX-512, where its binary-add post-op
  costs less than XLA's pass; on AVX2-only CPUs oneDNN 2.6's 1×1 kernels with it run up to 2× slower
  than without, more than the pass saves (docs/benchmarks.md, "An AVX2-only machine"), so a
  convolution with a residual then runs unfused. ``JAXFT_EPILOGUE_RESIDUAL=0`` / ``1`` overrides the answer."""
  return onednn.cpu_choice("JAXFT_EPILOGUE_RESIDUAL", {"avx512f"})


def conv_epilogue(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                  padding: Sequence[Sequence[int]], groups: int, epilogue: Epilogue) -> jax.Array:
  """``epilogue.apply(conv(x, kernel))`` as one oneDNN inference convolution (check
  :func:`jaxft.cpu.onednn.supported` and :func:`fusable` first).

  The per-channel ``mul`` scales the kernel's output channels (a weights-sized product, far
  smaller than the activations; rounded to ``x``'s type, as oneDNN would round the kernel anyway)
  and ``shift`` becomes the convolution's bias: oneDNN's per-channel multiply post-op costs more
  than the separate pass it would save (docs/benchmarks.md, "epilogue"). Then one rounding of the
  float32 result to ``x``'s type. Differentiable once, in every input (the backward pass
  recomputes the unfused forward with oneDNN's convolution and differentiates that). Returns a new
  array; no input is mutated.
  """
  o = kernel.shape[-1]
  if epilogue.mul is not None:
    kernel = kernel.astype(jnp.float32) * epilogue.mul.astype(jnp.float32)
  if x.dtype != jnp.float32:
    kernel = kernel.astype(x.dtype)
  bias = (jnp.zeros((o,), jnp.float32) if epilogue.shift is None
          else epilogue.shift.astype(jnp.float32))
  return _fused(x, kernel, bias, epilogue.residual, tuple(strides),
                tuple(tuple(p) for p in padding), groups, epilogue.act)


def _unfused(x, kernel, bias, residual, strides, padding, groups, act):
  y = onednn.conv(x, kernel, strides, padding, groups)
  return Epilogue(None, bias, residual, act).apply(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x, kernel, bias, residual, strides, padding, groups, act):
  return onednn.forward_epilogue(x, kernel, bias, residual, act, strides, padding, groups)


def _fused_fwd(x, kernel, bias, residual, strides, padding, groups, act):
  y = onednn.forward_epilogue(x, kernel, bias, residual, act, strides, padding, groups)
  return y, (x, kernel, bias, residual)


def _fused_bwd(strides, padding, groups, act, res, dy):
  # Inference is what this path is for; a gradient (saliency maps, attacks) is rare enough that
  # recomputing the convolution is cheaper than keeping its unfused output in every step.
  _, vjp = jax.vjp(functools.partial(_unfused, strides=strides, padding=padding, groups=groups,
                                     act=act), *res)
  return vjp(dy)


_fused.defvjp(_fused_fwd, _fused_bwd)
