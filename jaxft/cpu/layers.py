"""The CPU backend's layers: drop-ins for :mod:`jaxft.models.layers` with CPU-fast computations.

Each layer has the plain layer's parameters, names, shapes, initial values and results (to float32
rounding); only the computation differs, chosen while tracing by ``impl``
(:func:`jaxft.cpu.impl.resolve_impl`): :class:`Conv` runs the convolution plans of
:mod:`jaxft.cpu.conv` (oneDNN where loaded), :class:`BatchNorm` the GEMV channel sums of
:mod:`jaxft.cpu.norm`, :func:`max_pool` the VJP of :mod:`jaxft.cpu.pool`. :func:`cpu_layers` bundles
them as a :class:`~jaxft.models.layers.Layers` for ``Network(layers=...)``. Every pass is a
``custom_vjp``, so these layers are differentiable once (reverse mode); the plain layers have no such
limit.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxft.cpu import conv as conv_lib
from jaxft.cpu import epilogue as epilogue_lib
from jaxft.cpu import norm, onednn, pool
from jaxft.cpu.impl import resolve_impl
from jaxft.models import layers as plain


class Conv(nn.Conv):
  """``flax.linen.Conv`` whose computation is chosen by ``impl`` (``auto``, ``lax``, ``matmul``,
  ``hybrid``, ``onednn``; see :mod:`jaxft.cpu.conv` and :func:`jaxft.cpu.impl.resolve_impl`).

  Parameters (``kernel`` HWIO, ``bias``) are created exactly as ``nn.Conv`` creates them, with the same
  names, shapes and initial values, whatever ``impl``. The matmul, hybrid and onednn paths support NHWC
  inputs with explicit padding and no dilation; anything else runs ``nn.Conv`` itself. A convolution
  ``onednn`` cannot compute (not float32, several devices) runs ``hybrid`` (or ``matmul``) instead.

  Raises:
    jaxft.cpu.onednn.OneDNNUnavailableError: for ``impl="onednn"`` when oneDNN is not loaded.
  """

  impl: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array, epilogue: plain.Epilogue | None = None) -> jax.Array:
    """Returns the convolution of ``inputs``, followed by ``epilogue`` when one is given (the
    BatchNorm, residual add and activation of an inference step): computed inside oneDNN's
    convolution where it runs this one (:mod:`jaxft.cpu.epilogue`), else applied after it."""
    g = self.feature_group_count
    depthwise = g > 1 and g == inputs.shape[-1] == self.features
    impl = resolve_impl(self.impl, inputs.shape[-3] * inputs.shape[-2] if inputs.ndim == 4 else None,
                        depthwise, grouped=g > 1 and not depthwise)
    plain_conv = (isinstance(self.padding, str) or self.input_dilation not in (None, 1)
                  or self.kernel_dilation not in (None, 1) or inputs.ndim != 4
                  or self.mask is not None or len(self.kernel_size) != 2)
    if impl == "lax" or plain_conv:
      y = super().__call__(inputs)
      return y if epilogue is None else epilogue.apply(y)
    cin = inputs.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f"input channels {cin} not divisible by groups {self.feature_group_count}")
    kernel_shape = (*self.kernel_size, cin // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    master, master_bias = kernel, bias
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides or (1, 1))
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in self.padding)
    # The float32 master kernel goes in as it is: oneDNN converts it in its weights reorder and
    # returns a float32 gradient (convolve casts it for every other formulation).
    kernel = master if master.dtype == jnp.float32 else kernel
    if epilogue is not None:
      epilogue = epilogue.with_bias(master_bias)
      if (impl == "onednn" and epilogue_lib.fusable(epilogue)
          and onednn.supported(inputs.shape, kernel.shape, inputs.dtype, strides, padding, g)):
        return epilogue_lib.conv_epilogue(inputs, kernel, strides, padding, g, epilogue)
      return epilogue.apply(conv_lib.convolve(inputs, kernel, strides, padding, g, impl))
    y = conv_lib.convolve(inputs, kernel, strides, padding, g, impl)
    if bias is not None:
      y = y + bias
    return y


class BatchNorm(plain.BatchNorm):
  """:class:`jaxft.models.layers.BatchNorm` (torch semantics) whose channel sums are GEMVs on CPU.

  ``impl`` (``auto``, ``lax``, ``matmul``, ``onednn``; resolved as a convolution on the same map):
  ``lax`` is the plain layer; ``onednn`` with a bfloat16 input (where
  :func:`jaxft.cpu.onednn.norm_supported`) normalises a training batch with the compiled library's
  own loops (:func:`jaxft.cpu.onednn.batch_norm_train`, ``batch_norm.cc``), in bfloat16 with float32
  statistics and a following ReLU inside the same pass; otherwise
  :func:`jaxft.cpu.norm.batch_norm_train` / :func:`jaxft.cpu.norm.channel_affine`. Same parameters,
  statistics, values and gradients (to rounding), except that no gradient flows through the batch
  statistics on the compiled path (they only update the running averages).
  """

  impl: str = "auto"

  def affine(self, x: jax.Array, mul: jax.Array, shift: jax.Array) -> jax.Array:
    if resolve_impl(self.impl) == "lax":
      return super().affine(x, mul, shift)
    return norm.channel_affine(x, mul, shift, True)

  def normalize(self, x: jax.Array, scale: jax.Array, bias: jax.Array, relu: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    pixels = x.shape[1] * x.shape[2] if x.ndim == 4 else None
    impl = resolve_impl(self.impl, pixels)
    if impl == "lax":
      return super().normalize(x, scale, bias, relu)
    if (impl == "onednn" and x.dtype == jnp.bfloat16
        and onednn.norm_supported(x.shape, x.dtype)):
      # bfloat16: the compiled loops read x twice each way, in bfloat16 (XLA's would write a float32
      # copy of x for the GEMV sums), and take the ReLU along (docs/benchmarks.md, "BatchNorm by
      # hand"). float32 measured the same speed either way, so it keeps the GEMV path. The
      # statistics only feed the running averages, so their gradient is stopped (the compiled VJP
      # has no such term).
      y, mean, var = onednn.batch_norm_train(x, scale, bias, self.epsilon, relu)
      return y, lax.stop_gradient(mean), lax.stop_gradient(var)
    y, mean, var = norm.batch_norm_train(x, scale, bias, self.epsilon, True)
    return (plain.relu(y) if relu else y), mean, var


def max_pool(x: jax.Array, impl: str = "auto") -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)`` of NHWC ``x``: ``lax`` is the plain
  :func:`jaxft.models.layers.max_pool_3x3_s2`; ``onednn`` (where
  :func:`jaxft.cpu.onednn.pool_supported`) is :func:`jaxft.cpu.onednn.max_pool`, otherwise
  :func:`jaxft.cpu.pool.max_pool`. Same values and gradient routing (the first maximal tap); where
  windows overlap, an input's gradients may be summed in another order. ``x`` is not mutated."""
  pixels = x.shape[1] * x.shape[2] if x.ndim == 4 else None
  chosen = resolve_impl(impl, pixels)
  if chosen == "lax":
    return plain.max_pool_3x3_s2(x)
  if chosen == "onednn" and onednn.pool_supported(x.shape, x.dtype):
    # XLA:CPU's gradient was one fused loop evaluating every dilated tap and its argmax per input
    # element: 84 vs 12 ms for the ResNet stem's bfloat16 ReLU + max-pool (docs/benchmarks.md).
    return onednn.max_pool(x, 3, 2, 1)
  return pool.max_pool(x, 3, 2, 1)


@functools.lru_cache(maxsize=None)
def cpu_layers(impl: str = "auto") -> plain.Layers:
  """Returns the CPU layers (every one with this ``impl``) as a :class:`~jaxft.models.layers.Layers`.

  The same object for the same ``impl`` (so that modules built from it compare equal).

  Raises:
    ValueError: for an unknown implementation name.
  """
  resolve_impl(impl)  # validates the name
  return plain.Layers(conv=functools.partial(plain.conv, module=functools.partial(Conv, impl=impl)),
                      norm=functools.partial(BatchNorm, impl=impl),
                      max_pool=functools.partial(max_pool, impl=impl), conv_epilogue=True)
