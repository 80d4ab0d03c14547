"""The XLA:CPU flag choice: which ``XLA_FLAGS`` make convolution nets fast on CPU.

XLA reads ``XLA_FLAGS`` once, when its first backend starts, so :func:`configure_cpu` only helps
before any array exists; :func:`jaxft.cpu.enable` calls it (when the user set no ``XLA_FLAGS`` and
``JAXFT_CPU_FLAGS`` is not ``0``). Importing this module changes nothing.
"""

from __future__ import annotations

import os
import sys

# XLA:CPU's YNNPACK integration: its GEMM kernels ("individual_dot": each dot on its own) run the
# matmul-formulated convolutions faster than XLA's Eigen dots, while its convolution and fused
# element-wise/reduce kernels are slower (docs/benchmarks.md, "XLA flags").
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)

FLAGS_ENV = "JAXFT_CPU_FLAGS"
"""``0``: :func:`jaxft.cpu.enable` leaves ``XLA_FLAGS`` alone."""


def backend_initialised() -> bool:
  """Whether a JAX backend has started in this process (then ``XLA_FLAGS`` is read already).

  Never imports jax: without jax imported no backend can run. jax has no public "is the backend up"
  query, so the bridge's cache is read where jax is loaded.
  """
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def configure_cpu(force: bool = False) -> bool:
  """Adds :data:`CPU_XLA_FLAGS` to ``os.environ["XLA_FLAGS"]`` so that XLA:CPU runs convolution nets
  fast.

  Does nothing (and returns False) when a backend is already running, or — unless ``force`` — when
  ``XLA_FLAGS`` already names any of these flags. Flags already present in ``XLA_FLAGS`` are kept.

  Returns:
    True when ``XLA_FLAGS`` was changed.
  """
  if backend_initialised():
    return False
  current = os.environ.get("XLA_FLAGS", "")
  names = [f.split("=")[0] for f in CPU_XLA_FLAGS]
  if not force and any(n in current for n in names):
    return False
  missing = [f for f, n in zip(CPU_XLA_FLAGS, names) if n not in current]
  if not missing:
    return False
  os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
  return True
