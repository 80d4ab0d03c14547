"""Which formulation each CPU convolution (and BatchNorm / max-pool) runs: the implementation choice.

The choice is made while a function is traced, from the layer's ``impl`` (``auto``, ``lax``,
``matmul``, ``hybrid``, ``onednn``), the enclosing :func:`impl_scope`, the default backend, the device
count, the input's map size and whether the oneDNN wrapper is already loaded. It never builds anything:
``auto`` takes oneDNN only once :func:`jaxft.cpu.enable` (or ``python -m jaxft.cpu build`` followed
by :func:`jaxft.cpu.onednn.load`) has loaded it. The thresholds are measured; see docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax

from jaxft.cpu import onednn

IMPLS = ("auto", "lax", "matmul", "hybrid", "onednn")

# On CPU, ``auto`` is ``onednn`` (every pass by oneDNN's direct convolutions) for dense and depthwise
# convolutions whose input has at least this many pixels, when oneDNN is loaded and preferred on this
# CPU (AVX-512; on AVX2-only CPUs XLA's plans were faster: onednn.preferred) (other grouped
# convolutions only when asked for: not measured). On 2×2 and 1×1 maps one GEMM is faster; from 4×4 up
# oneDNN is as fast or faster in every pass (docs/benchmarks.md, "oneDNN convolutions").
ONEDNN_MIN_PIXELS = 9

# On CPU, ``auto`` is ``matmul`` for convolutions whose input has at most this many pixels (H·W) and
# ``hybrid`` above: XLA:CPU's convolution is pathological on tiny maps, while on large maps its forward
# pass beats the patch GEMM, whose k²-times larger patch matrix costs more memory traffic than it
# saves. Without oneDNN (or below ONEDNN_MIN_PIXELS), depthwise convolutions use shifted products:
# XLA:CPU's depthwise convolution is far slower in the forward pass (docs/benchmarks.md).
SMALL_MAP_PIXELS = 16

_scope = threading.local()


@contextlib.contextmanager
def impl_scope(impl: str) -> Iterator[None]:
  """Within this context, CPU layers built with ``impl="auto"`` use ``impl`` instead.

  The choice is made when a function is traced, so wrap the first call of a jitted function (the
  one that compiles), e.g. to compare implementations on the same model::

    with impl_scope("lax"):
      y = jax.jit(lambda v, x: net.apply(v, x))(variables, x)

  jax caches the trace of a function it has jitted before (keyed by the function, not by this
  scope), so give each implementation a new function object, as the ``lambda`` above does.

  Raises:
    ValueError: for an unknown implementation name.
  """
  resolve_impl(impl)  # validates the name
  prev = getattr(_scope, "impl", "auto")
  _scope.impl = impl
  try:
    yield
  finally:
    _scope.impl = prev


def resolve_impl(impl: str, pixels: int | None = None, depthwise: bool = False,
                 grouped: bool = False) -> str:
  """Returns the implementation ``impl`` means here: ``auto`` is mapped to the enclosing
  :func:`impl_scope`, else to the best implementation for this convolution.

  On a CPU default backend ``auto`` is ``onednn`` for dense and depthwise convolutions (not other
  ``grouped`` ones, whose speed in oneDNN is unmeasured) on inputs of at least
  :data:`ONEDNN_MIN_PIXELS` pixels when :func:`jaxft.cpu.onednn.loaded` (one device) and
  :func:`jaxft.cpu.onednn.preferred` on this CPU (AVX-512); otherwise
  ``matmul`` (GEMMs forward and backward; shifted products when depthwise) for depthwise convolutions
  and for inputs of at most :data:`SMALL_MAP_PIXELS` pixels (or ``pixels`` None), and ``hybrid``
  (``lax.conv`` forward, GEMM gradients) above. On other backends it is ``lax`` (also for an explicit
  ``onednn``). ``hybrid`` falls back to ``matmul`` for depthwise convolutions. Nothing is built.

  Raises:
    ValueError: for an unknown implementation name.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; valid: {', '.join(IMPLS)}")
  if impl == "auto":
    impl = getattr(_scope, "impl", "auto")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "lax"
    if (pixels is not None and pixels >= ONEDNN_MIN_PIXELS and not grouped
        and jax.device_count() == 1 and onednn.loaded() and onednn.preferred()):
      return "onednn"
    small = pixels is None or pixels <= SMALL_MAP_PIXELS
    return "matmul" if small or depthwise else "hybrid"
  if impl == "onednn" and jax.default_backend() != "cpu":
    return "lax"  # oneDNN here is a CPU library; elsewhere the backend's own convolutions
  if impl == "hybrid" and depthwise:
    return "matmul"
  return impl
