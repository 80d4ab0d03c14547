"""The CPU backend: everything jaxft does to run fast on XLA:CPU, switched on by one explicit call.

``import jaxft`` (and importing this package) changes nothing in the process. A command-line entry
point — or a library user who wants the CPU speed-ups — calls :func:`enable` first thing, before JAX
starts, and builds networks with :func:`network_layers`::

  import jaxft.cpu
  jaxft.cpu.enable()                       # before any JAX array exists
  net = jaxft.models.Network(spec, layers=jaxft.cpu.network_layers())

Modules, one idea each: :mod:`~jaxft.cpu.flags` (the XLA flag choice), :mod:`~jaxft.cpu.allocator`
(glibc malloc tuning, tcmalloc relaunch), :mod:`~jaxft.cpu.onednn` (oneDNN convolutions as XLA custom
calls: build, load, call), :mod:`~jaxft.cpu.impl` (which formulation each layer runs),
:mod:`~jaxft.cpu.conv` and :mod:`~jaxft.cpu.winograd` (convolutions as GEMMs), :mod:`~jaxft.cpu.norm`
and :mod:`~jaxft.cpu.pool` (BatchNorm and max-pool VJPs), :mod:`~jaxft.cpu.layers` (the flax layers
built from them), :mod:`~jaxft.cpu.clip` (gradient clipping by a GEMV norm). ``python -m jaxft.cpu
build`` builds the oneDNN wrapper ahead of time; ``python -m jaxft.cpu status`` says what is in use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from jaxft import _lazy
from jaxft.cpu import allocator, flags

if TYPE_CHECKING:
  from jaxft.models.layers import Layers

_enabled = False


def enable(*, relaunch: bool = False) -> None:
  """Switches the process-wide CPU speed-ups on. Call it once, before any JAX computation.

  In order:

  1. ``relaunch`` (command-line entry points only): re-executes this process under tcmalloc where the
     machine has it (:func:`jaxft.cpu.allocator.relaunch_with_tcmalloc`; ``JAXFT_TCMALLOC=0`` opts
     out, ``JAXFT_TCMALLOC=/path/lib.so`` picks one). When it relaunches, it does not return: the new
     process runs from the start and calls this again.
  2. XLA flags (:data:`jaxft.cpu.flags.CPU_XLA_FLAGS`) added to ``os.environ["XLA_FLAGS"]`` — only
     when the user has set no ``XLA_FLAGS`` and ``JAXFT_CPU_FLAGS`` is not ``0``, and only before the
     first backend starts.
  3. glibc's malloc keeps freed memory for reuse (:func:`jaxft.cpu.allocator.retain_freed_memory`;
     ``JAXFT_MALLOC_TUNING=0`` opts out).
  4. The oneDNN convolutions are built (cached in ``$JAXFT_NATIVE_CACHE_DIR``, default
     ``~/.cache/jaxft/native``) and loaded (:func:`jaxft.cpu.onednn.load`; ``JAXFT_ONEDNN=0`` skips
     this, ``JAXFT_ONEDNN=1`` makes a failure an error; otherwise a failure means XLA's own
     convolutions).

  Afterwards :func:`network_layers` returns the CPU layers (on a CPU default backend). Calling it
  again does steps 2–4 again, which change nothing the second time.

  Raises:
    jaxft.cpu.onednn.OneDNNUnavailableError: ``JAXFT_ONEDNN=1`` and oneDNN cannot be built or loaded.
  """
  global _enabled
  if relaunch:
    allocator.relaunch_with_tcmalloc()
  if "XLA_FLAGS" not in os.environ and os.environ.get(flags.FLAGS_ENV, "1") != "0":
    flags.configure_cpu()
  if os.environ.get(allocator.MALLOC_TUNING_ENV, "1") != "0":
    allocator.retain_freed_memory()
  from jaxft.cpu import onednn  # pylint: disable=g-import-not-at-top  # imports jax: after the relaunch
  onednn.load()
  _enabled = True


def enabled() -> bool:
  """Whether :func:`enable` has been called in this process."""
  return _enabled


def network_layers(impl: str = "auto") -> "Layers":
  """Returns the layers for ``Network(layers=...)``: the CPU backend's
  (:func:`jaxft.cpu.layers.cpu_layers` with ``impl``) once :func:`enable` was called and the default
  backend is CPU, else the plain :class:`~jaxft.models.layers.Layers` (GPU/TPU, or not enabled).

  Raises:
    ValueError: for an unknown ``impl`` (see :data:`jaxft.cpu.impl.IMPLS`).
  """
  from jaxft.cpu.impl import IMPLS  # pylint: disable=g-import-not-at-top
  from jaxft.models.layers import Layers  # pylint: disable=g-import-not-at-top
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; valid: {', '.join(IMPLS)}")
  if not _enabled:  # asks nothing of JAX: the backend must not start before enable() set its flags
    return Layers()
  import jax  # pylint: disable=g-import-not-at-top
  from jaxft.cpu.layers import cpu_layers  # pylint: disable=g-import-not-at-top
  return cpu_layers(impl) if jax.default_backend() == "cpu" else Layers()


class NormFunctions(NamedTuple):
  """The global norm and clipping a train step should use (same values whichever is returned)."""

  global_norm: Callable[[Any], Any]  # tree → float32 scalar, as ``optax.tree.norm``
  clip_by_global_norm: Callable[[float], Any]  # max_norm → a GradientTransformation, as optax's


def norm_functions() -> NormFunctions:
  """Returns the CPU backend's GEMV norm and clipping (:mod:`jaxft.cpu.clip`) once :func:`enable` was
  called and the default backend is CPU, else optax's (``optax.tree.norm``,
  ``optax.clip_by_global_norm``). Kept because they make a train step measurably faster on XLA:CPU
  (docs/benchmarks.md, "Norms")."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  if _enabled and jax.default_backend() == "cpu":
    from jaxft.cpu import clip  # pylint: disable=g-import-not-at-top
    return NormFunctions(clip.global_norm, clip.clip_by_global_norm)
  return NormFunctions(optax.tree.norm, optax.clip_by_global_norm)


def status() -> str:
  """Returns one line: whether :func:`enable` ran, the allocator in use, the oneDNN convolutions in
  use (or why none are), what computes bfloat16 convolutions and the XLA flags. Builds and loads
  nothing."""
  from jaxft.cpu import onednn  # pylint: disable=g-import-not-at-top
  state = "enabled" if _enabled else "not enabled"
  xla = os.environ.get("XLA_FLAGS", "") or "unset"
  bf16 = ("oneDNN (AMX/AVX512-BF16)" if onednn.bf16_supported() and onednn.loaded()
          else "XLA (no bfloat16 instructions)" if not onednn.bf16_supported() else "XLA")
  convs = onednn.status()
  if onednn.loaded() and not onednn.preferred():
    convs += " (not chosen by impl='auto' on this CPU: it has no AVX-512, or JAXFT_ONEDNN_AUTO=0)"
  return (f"jaxft.cpu {state}; allocator {allocator.loaded_allocator()}; oneDNN convolutions "
          f"{convs}; bfloat16 convolutions {bf16}; XLA_FLAGS {xla}")


# These need jax and flax, which `import jaxft.cpu` must not load (enable() may relaunch first).
__getattr__, __dir__, _lazy_names = _lazy.attach(__name__, {
    "impl_scope": ".impl", "cpu_layers": ".layers", "clip_by_global_norm": ".clip",
    "OneDNNUnavailableError": ".onednn"}, ("allocator", "clip", "conv", "flags", "impl", "layers", "norm",
                                            "onednn", "pool", "winograd"))

__all__ = ["NormFunctions", "enable", "enabled", "network_layers", "norm_functions", "status", *_lazy_names]
