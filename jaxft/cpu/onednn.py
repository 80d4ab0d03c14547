"""oneDNN's direct convolutions inside jitted JAX code on CPU, as XLA FFI custom calls.

XLA:CPU computes convolutions with Eigen's spatial convolution (patches packed for a GEMM), slower than
PyTorch's CPU convolutions, which are oneDNN's direct (JIT-generated, blocked) kernels
(docs/benchmarks.md, "Fifth session"). This module calls the same library: ``onednn_conv.cc`` (beside
this file) wraps oneDNN's convolution forward, backward-data and backward-weights primitives as three
XLA FFI handlers (with its matmul, inference-epilogue convolutions and training max pooling; ``batch_norm.cc`` adds
jaxft's own training-mode BatchNorm loops to the same library), compiled against oneDNN — ``$DNNLROOT`` if set, else the system's (Debian/Ubuntu: ``apt-get
install libdnnl-dev``), else the PyPI wheels (``pip install jaxft[onednn]``; :func:`onednn_root`) —
and jaxlib's FFI headers, and cached in ``$JAXFT_NATIVE_CACHE_DIR`` (default
``~/.cache/jaxft/native``).

Building and loading are explicit steps — :func:`build` (``python -m jaxft.cpu build``) and
:func:`load` (called by :func:`jaxft.cpu.enable`) — never a side effect of tracing: everything the
convolutions ask while a function is traced (:func:`loaded`, :func:`supported`, :func:`status`) only
reads what was loaded. Nothing here is required: without a C++ compiler or oneDNN, :func:`load` returns
False and jaxft's CPU convolutions use XLA's own (``jaxft.cpu.conv``). ``JAXFT_ONEDNN=0`` turns it
off; ``JAXFT_ONEDNN=1`` makes its absence an error (CI uses this so that the tests cannot silently
skip it).

Supported: float32, and bfloat16 activations where the CPU has bfloat16 instructions (AMX-BF16 or
AVX512-BF16, :func:`bf16_supported`) with a float32 or bfloat16 kernel (a float32 master kernel is
converted inside oneDNN's weights reorder and its gradient comes back in float32, accumulated in
float32); NHWC × HWIO, any feature groups (depthwise included), no dilation, non-negative
explicit padding, one device in all (the custom calls have no sharding rule, so with several devices
XLA would gather the batch onto each; :func:`supported` says no). The backward passes are custom calls
too, so a function that uses these convolutions can be differentiated once, not twice (plain layers,
or ``impl_scope("lax")``, for higher-order derivatives).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_SOURCES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
                 for name in ("onednn_conv.cc", "batch_norm.cc"))
_TARGETS = {"fwd": "jaxft_onednn_conv_fwd", "bwd_data": "jaxft_onednn_conv_bwd_data",
            "bwd_weights": "jaxft_onednn_conv_bwd_weights", "bn_fwd": "jaxft_bn_fwd",
            "bn_bwd": "jaxft_bn_bwd", "matmul": "jaxft_onednn_matmul",
            "conv_bias": "jaxft_onednn_conv_bias", "conv_bias_add": "jaxft_onednn_conv_bias_add",
            "pool_fwd": "jaxft_onednn_pool_fwd", "pool_bwd": "jaxft_onednn_pool_bwd"}

_lock = threading.Lock()
# Once loading was attempted: "lib" (ctypes.CDLL) and "path", or "error" (str).
_state: dict[str, object] = {}


class OneDNNUnavailableError(RuntimeError):
  """The oneDNN convolutions were required (``JAXFT_ONEDNN=1``, or ``impl="onednn"``) but could not be
  built or loaded, or were not loaded."""


def _mode() -> str:
  v = os.environ.get("JAXFT_ONEDNN", "auto").strip().lower()
  if v in ("0", "false", "off", "no"):
    return "off"
  if v in ("1", "true", "on", "yes", "require"):
    return "require"
  return "auto"


def cache_dir() -> str:
  """The folder compiled libraries are kept in: ``$JAXFT_NATIVE_CACHE_DIR``, else
  ``~/.cache/jaxft/native`` (``$XDG_CACHE_HOME`` respected)."""
  return os.environ.get("JAXFT_NATIVE_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxft",
      "native")


def pip_prefix() -> str | None:
  """The prefix of a oneDNN installed from PyPI into this environment (``pip install
  jaxft[onednn]``: the ``onednn`` and ``onednn-devel`` wheels put ``lib/libdnnl.so`` and
  ``include/oneapi/dnnl`` under ``sys.prefix``), or None."""
  prefix = sys.prefix
  if (os.path.isfile(os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp"))
      and any(os.path.exists(os.path.join(prefix, "lib", n)) for n in ("libdnnl.so", "libdnnl.so.3"))):
    return prefix
  return None


def _system_has_onednn() -> bool:
  return any(os.path.isfile(os.path.join(d, "oneapi", "dnnl", "dnnl.hpp"))
             for d in ["/usr/local/include", "/usr/include"]
             + [d for d in os.environ.get("CPATH", "").split(os.pathsep) if d])


def onednn_root() -> str | None:
  """The install prefix jaxft compiles against: ``$DNNLROOT`` when set; else none (the system's
  headers and library, e.g. Debian's ``libdnnl-dev``) when they are installed; else the PyPI
  wheels' prefix (:func:`pip_prefix`) when those are. The system library comes before the wheels
  because the wheels are a SYCL build that needs Intel's OpenCL CPU runtime (~1 GB of further
  wheels) and measured no faster here (docs/benchmarks.md, "bfloat16")."""
  if os.environ.get("DNNLROOT"):
    return os.environ["DNNLROOT"]
  if _system_has_onednn():
    return None
  return pip_prefix()


def _onednn_version_header() -> bytes:
  """The installed ``dnnl_version.h`` (empty if not found), so that a oneDNN upgrade rebuilds."""
  root = onednn_root()
  roots = [os.path.join(root, "include")] if root else []
  roots += [d for d in os.environ.get("CPATH", "").split(os.pathsep) if d]
  roots += ["/usr/local/include", "/usr/include"]
  for root in roots:
    try:
      with open(os.path.join(root, "oneapi", "dnnl", "dnnl_version.h"), "rb") as f:
        return f.read()
    except OSError:
      continue
  return b""


def _compiler() -> str:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def _compile_command(sources: Sequence[str], out: str) -> list[str]:
  # -O3: GCC vectorises batch_norm.cc's channel loops only there (5.4x faster than at -O2, measured);
  # -fopenmp: its loops' threads (with Debian's oneDNN, the same libgomp team as oneDNN's; with the
  # PyPI wheels a team of its own, never running beside oneDNN's: both take one lock);
  # -ffp-contract=off: its forward and backward passes must round the BatchNorm affine the same way
  # (the ReLU mask is recomputed, not stored).
  cmd = [_compiler(), "-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
         f"-I{jax.ffi.include_dir()}"]
  root = onednn_root()
  if root:
    lib = next((d for d in (os.path.join(root, "lib64"), os.path.join(root, "lib"))
                if os.path.isdir(d)), os.path.join(root, "lib"))
    # DT_RPATH (not RUNPATH) so that libdnnl's own dependencies (the wheels' SYCL and TBB runtimes,
    # in the same folder) are found through this library without LD_LIBRARY_PATH.
    cmd += [f"-I{os.path.join(root, 'include')}", f"-L{lib}", "-Wl,--disable-new-dtags",
            f"-Wl,-rpath,{lib}"]
  return cmd + [*sources, "-o", out, "-ldnnl"]


def library_path() -> str:
  """Where the compiled library for these sources, jaxlib and oneDNN prefix lives (built or not)."""
  h = hashlib.sha256()
  for source in _SOURCES:
    with open(source, "rb") as f:
      h.update(f.read())
  h.update(" ".join(_compile_command((), "")).encode())
  h.update(jax.ffi.include_dir().encode())
  h.update(jax.__version__.encode())
  h.update((onednn_root() or "").encode())
  h.update(_compiler().encode())
  h.update(_onednn_version_header())
  return os.path.join(cache_dir(), f"libjaxft_onednn-{h.hexdigest()[:16]}.so")


def build(force: bool = False) -> str:
  """Compiles ``onednn_conv.cc`` and ``batch_norm.cc`` into :func:`library_path` unless it is there
  already.

  The library is written to a temporary file and renamed into place, so concurrent builds and
  interrupted ones never leave a broken library behind.

  Returns:
    The library's path.

  Raises:
    RuntimeError: when the compiler is missing or fails (the message has its output and the fix).
  """
  path = library_path()
  if os.path.exists(path) and not force:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = _compile_command(_SOURCES, tmp)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:  # e.g. a Clang without libomp: batch_norm.cc's loops then run on one core
      proc = subprocess.run([a for a in cmd if a != "-fopenmp"], capture_output=True, text=True,
                            timeout=600, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    os.unlink(tmp)
    raise RuntimeError(f"cannot run the C++ compiler {cmd[0]!r} ({e}); install one (e.g. g++) or set "
                       "CXX") from e
  if proc.returncode != 0:
    os.unlink(tmp)
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    raise RuntimeError(f"building jaxft's oneDNN convolutions failed:\n{tail}\nInstall oneDNN's "
                       "headers and library (Debian/Ubuntu: apt-get install libdnnl-dev) or set "
                       "DNNLROOT to its install prefix; JAXFT_ONEDNN=0 turns this off.")
  os.replace(tmp, path)
  return path


def _point_sycl_at_the_wheels_cpu_runtime() -> None:
  """The PyPI oneDNN is a SYCL build: its CPU engine is Intel's OpenCL CPU runtime, which the
  OpenCL loader finds through ``OCL_ICD_FILENAMES`` (its ``/etc/OpenCL/vendors`` entry is inside
  the environment, where the loader does not look). Set only when compiling against the wheels and
  unset by the user — part of the explicit :func:`load` step, never of an import."""
  root = onednn_root()
  if root is None or root != pip_prefix() or os.environ.get("OCL_ICD_FILENAMES"):
    return
  icd = os.path.join(root, "lib", "libintelocl.so")
  if os.path.exists(icd):
    os.environ["OCL_ICD_FILENAMES"] = icd


def _load() -> ctypes.CDLL | None:
  with _lock:
    if "lib" in _state or "error" in _state:
      return _state.get("lib")  # type: ignore[return-value]
    try:
      path = build()
      _point_sycl_at_the_wheels_cpu_runtime()
      try:
        lib = ctypes.CDLL(path)
      except OSError:  # e.g. built against a oneDNN that has since been replaced: build it again
        path = build(force=True)
        lib = ctypes.CDLL(path)
      for name in _TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
      _state["lib"], _state["path"] = lib, path
    except Exception as e:  # pylint: disable=broad-except  # any failure means: use XLA's convs
      _state["error"] = f"{type(e).__name__}: {e}"
    return _state.get("lib")  # type: ignore[return-value]


def load() -> bool:
  """Builds the oneDNN convolutions if needed (:func:`build`) and registers them with XLA: the one
  explicit step (:func:`jaxft.cpu.enable` calls it). Tried once per process; later calls return the
  first answer.

  Returns:
    True when they are loaded; False when ``JAXFT_ONEDNN=0`` (nothing is built), or when building or
    loading failed and ``JAXFT_ONEDNN`` is not ``1`` (:func:`status` says why).

  Raises:
    OneDNNUnavailableError: when ``JAXFT_ONEDNN=1`` and they cannot be built or loaded.
  """
  mode = _mode()
  if mode == "off":
    return False
  if _load() is not None:
    return True
  if mode == "require":
    raise OneDNNUnavailableError(f"JAXFT_ONEDNN=1 but oneDNN convolutions are unavailable: "
                                 f"{_state['error']}")
  return False


def loaded() -> bool:
  """Whether the oneDNN convolutions are loaded and registered with XLA (and not turned off by
  ``JAXFT_ONEDNN=0``). Never builds or loads anything: safe while tracing."""
  return _mode() != "off" and "lib" in _state


def status() -> str:
  """One line: which oneDNN is in use, or why none is. Never builds or loads anything."""
  if _mode() == "off":
    return "off (JAXFT_ONEDNN=0)"
  if "error" in _state:
    return f"unavailable ({_state['error']})"
  lib = _state.get("lib")
  if lib is None:
    built = "built" if os.path.exists(library_path()) else "not built"
    return f"not loaded ({built}; jaxft.cpu.enable() loads it)"
  v = lib.jaxft_onednn_version()
  return f"oneDNN {v // 10000}.{v // 100 % 100}.{v % 100} ({_state['path']})"


def bf16_supported() -> bool:
  """Whether this CPU has bfloat16 dot-product instructions (AMX-BF16 or AVX512-BF16), read from
  ``/proc/cpuinfo`` once; without them oneDNN's bfloat16 convolutions are emulated, slower than
  float32, so :func:`supported` declines bfloat16 (the layer then computes in XLA).
  ``JAXFT_ONEDNN_BF16=0`` / ``1`` overrides the answer (e.g. to test the fallback)."""
  return cpu_choice("JAXFT_ONEDNN_BF16", {"amx_bf16", "avx512_bf16"})


def preferred() -> bool:
  """Whether ``impl="auto"`` takes oneDNN's convolutions on this CPU once they are loaded: where the
  CPU has AVX-512, on which they were measured faster than XLA's plans in every workload; not on
  AVX2-only CPUs, where oneDNN 2.6's AVX2 kernels ran ResNet-50 6–10% slower than XLA's plans in
  training and eval, at 32 and 224 px (docs/benchmarks.md, "An AVX2-only machine").
  ``JAXFT_ONEDNN_AUTO=0`` / ``1`` overrides the answer; an explicit ``impl="onednn"`` is unaffected."""
  return cpu_choice("JAXFT_ONEDNN_AUTO", {"avx512f"})


def cpu_choice(env: str, any_of: set[str]) -> bool:
  """A per-CPU choice: ``$env`` when it is ``0`` or ``1``, else whether this CPU has any of the
  flags ``any_of`` (:func:`cpu_flags`)."""
  forced = os.environ.get(env, "").strip()
  if forced in ("0", "1"):
    return forced == "1"
  return bool(cpu_flags() & any_of)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
  """This CPU's instruction-set flags (``/proc/cpuinfo``, read once; empty where it cannot be read)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def supported(x_shape: Sequence[int], kernel_shape: Sequence[int], dtype, strides: Sequence[int],
              padding: Sequence[Sequence[int]], groups: int = 1) -> bool:
  """Whether :func:`conv` can compute this convolution here: a float32 convolution, or a bfloat16
  one on a CPU with bfloat16 instructions (:func:`bf16_supported`), that it supports, on a single CPU
  device, with the library loaded (:func:`loaded`; nothing is built)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and not bf16_supported():
    return False
  if (len(x_shape) != 4 or len(kernel_shape) != 4 or dtype not in _DTYPES
      or groups < 1 or kernel_shape[2] * groups != x_shape[3] or kernel_shape[3] % groups
      or len(strides) != 2 or min(strides) < 1
      or len(padding) != 2 or any(len(pp) != 2 or min(pp) < 0 for pp in padding)
      or min(x_shape) < 1 or min(kernel_shape) < 1
      or min(_out_shape(x_shape, kernel_shape, strides, padding)) < 1):
    return False
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  return loaded()


def _out_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, int, int, int]:
  n, h, w, _ = x_shape
  kh, kw, _, o = kernel_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, o)


_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _call(name: str, shape, dtype, *args, strides, padding, groups) -> jax.Array:
  if not loaded():  # the targets must be registered before XLA compiles
    raise OneDNNUnavailableError(f"oneDNN convolutions are {status()}")
  for a in args:
    if a.dtype not in _DTYPES:
      raise ValueError(f"oneDNN convolutions take float32 or bfloat16 arrays, got {a.dtype}; cast, "
                       "or use jaxft.cpu.layers.Conv, which falls back for other dtypes")
  call = jax.ffi.ffi_call(_TARGETS[name], jax.ShapeDtypeStruct(tuple(shape), dtype),
                          vmap_method="sequential")
  return call(*args, strides=np.asarray(strides, np.int64),
              padding=np.asarray([p for pp in padding for p in pp], np.int64),
              groups=np.int64(groups))


def forward(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
            padding: Sequence[Sequence[int]], groups: int = 1) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, strides, padding, ('NHWC', 'HWIO', 'NHWC'),
  feature_group_count=groups)`` by oneDNN, computed in ``x``'s type (a float32 ``kernel`` with
  bfloat16 ``x`` is rounded to bfloat16 inside oneDNN).

  Returns a new array of ``x``'s type; ``x`` and ``kernel`` are not mutated. Not differentiable
  itself (see :func:`conv`).
  """
  return _call("fwd", _out_shape(x.shape, kernel.shape, strides, padding), x.dtype, x, kernel,
               strides=strides, padding=padding, groups=groups)


def input_grad(dy: jax.Array, kernel: jax.Array, x_shape: Sequence[int], strides: Sequence[int],
               padding: Sequence[Sequence[int]], groups: int = 1) -> jax.Array:
  """The gradient of :func:`forward` with respect to ``x`` (of shape ``x_shape``) for output
  cotangent ``dy``. Returns a new array of ``dy``'s type; inputs are not mutated."""
  return _call("bwd_data", x_shape, dy.dtype, dy, kernel, strides=strides, padding=padding,
               groups=groups)


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                padding: Sequence[Sequence[int]], groups: int = 1,
                dtype=jnp.float32) -> jax.Array:
  """The gradient of :func:`forward` with respect to the kernel (of shape ``kernel_shape``) for
  output cotangent ``dy``, accumulated in float32 and returned as ``dtype`` (float32 or bfloat16).
  Returns a new array; inputs are not mutated."""
  return _call("bwd_weights", kernel_shape, jnp.dtype(dtype), x, dy, strides=strides,
               padding=padding, groups=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
         padding: tuple[tuple[int, int], ...], groups: int = 1) -> jax.Array:
  """Differentiable NHWC × HWIO convolution with ``groups`` feature groups, every pass by oneDNN
  (check :func:`supported` first), computed in ``x``'s type (float32, or bfloat16 with float32
  accumulation). ``kernel`` may be float32 with bfloat16 ``x`` (a float32 master kernel: its gradient
  is float32). Same values as ``lax.conv`` of ``x`` and ``kernel.astype(x.dtype)`` to rounding;
  neither input is mutated."""
  return forward(x, kernel, strides, padding, groups)


def _conv_fwd(x, kernel, strides, padding, groups):
  return forward(x, kernel, strides, padding, groups), (x, kernel)


# The activations the inference convolution can apply itself (its ``act`` attribute).
EPILOGUE_ACTS = {"identity": 0, "relu": 1, "relu6": 2}


def forward_epilogue(x: jax.Array, kernel: jax.Array, bias: jax.Array, residual: jax.Array | None,
                     act: str, strides: Sequence[int], padding: Sequence[Sequence[int]],
                     groups: int = 1) -> jax.Array:
  """``act(forward(x, kernel) + bias [+ residual])`` (``bias`` float32 ``[O]``, ``act`` in
  :data:`EPILOGUE_ACTS`) as one oneDNN inference convolution with post-ops, computed in float32 and
  rounded once to ``x``'s type. Check :func:`supported` first.

  Returns a new array of ``x``'s type; no input is mutated. Not differentiable itself
  (:func:`jaxft.cpu.epilogue.conv_epilogue` is).
  """
  if not loaded():
    raise OneDNNUnavailableError(f"oneDNN convolutions are {status()}")
  if act not in EPILOGUE_ACTS:
    raise ValueError(f"oneDNN's convolution epilogue has no activation {act!r}; valid: "
                     f"{sorted(EPILOGUE_ACTS)}")
  out = jax.ShapeDtypeStruct(_out_shape(x.shape, kernel.shape, strides, padding), x.dtype)
  attrs = dict(strides=np.asarray(strides, np.int64),
               padding=np.asarray([p for pp in padding for p in pp], np.int64),
               groups=np.int64(groups), act=np.int64(EPILOGUE_ACTS[act]))
  args = (x, kernel, bias.astype(jnp.float32))
  if residual is None:
    return jax.ffi.ffi_call(_TARGETS["conv_bias"], out, vmap_method="sequential")(*args, **attrs)
  return jax.ffi.ffi_call(_TARGETS["conv_bias_add"], out, vmap_method="sequential")(
      *args, residual.astype(x.dtype), **attrs)


def matmul(a: jax.Array, b: jax.Array, dtype=jnp.float32, *, trans_a: bool = False,
           trans_b: bool = False) -> jax.Array:
  """``op(a) @ op(b)`` by oneDNN's matmul (``op`` transposes when ``trans_a`` / ``trans_b``: a
  stride, never a copy), for 2-D ``a`` and ``b`` of one type (float32 or bfloat16), accumulated in
  float32 and returned as ``dtype``. Check :func:`matmul_supported` first. Returns a new array;
  inputs are not mutated. Not differentiable itself."""
  if not loaded():
    raise OneDNNUnavailableError(f"oneDNN matmul is {status()}")
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  call = jax.ffi.ffi_call(_TARGETS["matmul"], jax.ShapeDtypeStruct((m, n), jnp.dtype(dtype)),
                          vmap_method="sequential")
  return call(a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b))


def matmul_supported(dtype) -> bool:
  """Whether :func:`matmul` runs here for this type: bfloat16 with the CPU's bfloat16
  instructions (float32 GEMMs stay XLA's, as fast), one CPU device, library loaded."""
  return (jnp.dtype(dtype) == jnp.bfloat16 and bf16_supported() and jax.default_backend() == "cpu"
          and jax.device_count() == 1 and loaded())


def gemm_tn(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
  """``a.T @ b`` for ``a [M, K]`` and ``b [M, N]`` of one type (float32 or bfloat16) by oneDNN's
  matmul, accumulated in float32 and returned as ``dtype``. Returns a new array; inputs are not
  mutated."""
  return matmul(a, b, dtype, trans_a=True)


def _pointwise_kernel_grad(x, dy, kernel_shape, strides, dtype):
  """The kernel gradient of an unpadded 1×1 convolution as one GEMM over the (strided) pixels."""
  if tuple(strides) != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :][:, :dy.shape[1], :dy.shape[2], :]
  cin, cout = kernel_shape[2], kernel_shape[3]
  return gemm_tn(x.reshape(-1, cin), dy.reshape(-1, cout), dtype).reshape(kernel_shape)


def _conv_bwd(strides, padding, groups, res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  if (x.dtype == jnp.bfloat16 and kernel.shape[:2] == (1, 1) and groups == 1
      and all(p == (0, 0) for p in padding)):
    # bfloat16 1×1: oneDNN's matmul is ~3x faster than its convolution backward-weights kernel
    # (docs/benchmarks.md, "bfloat16"); the same sums, accumulated in float32.
    dk = _pointwise_kernel_grad(x, dy, kernel.shape, strides, kernel.dtype)
  else:
    dk = kernel_grad(x, dy, kernel.shape, strides, padding, groups, kernel.dtype)
  return input_grad(dy, kernel, x.shape, strides, padding, groups), dk


conv.defvjp(_conv_fwd, _conv_bwd)


# ---------------------------------------------------------------------------------------------------
# Batch normalization (training mode), optionally fused with the ReLU after it: batch_norm.cc
# ---------------------------------------------------------------------------------------------------


def norm_supported(x_shape: Sequence[int], dtype) -> bool:
  """Whether :func:`batch_norm_train` can normalise an array of this shape and type here: NHWC,
  float32 or bfloat16 (the latter with :func:`bf16_supported`), one CPU device, library loaded."""
  dtype = jnp.dtype(dtype)
  if len(x_shape) != 4 or min(x_shape) < 1 or dtype not in _DTYPES:
    return False
  if dtype == jnp.bfloat16 and not bf16_supported():
    return False
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  return loaded()


def _bn_forward(x, scale, shift, epsilon, relu):
  if not loaded():
    raise OneDNNUnavailableError(f"jaxft's batch normalization is {status()}")
  vec = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
  return jax.ffi.ffi_call(_TARGETS["bn_fwd"], (jax.ShapeDtypeStruct(x.shape, x.dtype), vec, vec),
                          vmap_method="sequential")(
      x, scale.astype(jnp.float32), shift.astype(jnp.float32), epsilon=np.float32(epsilon),
      relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float,
                     relu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over the last axis of NHWC ``x`` by the compiled library's own loops
  (``batch_norm.cc``; check :func:`norm_supported` first): ``(y, batch mean, biased batch
  variance)`` with ``y = (x - mean) / sqrt(var + epsilon) * scale + shift`` in ``x``'s type
  (statistics and the arithmetic in float32), followed by ``max(y, 0)`` when ``relu``.

  Differentiable in ``x``, ``scale`` and ``shift`` through ``y`` only: the returned statistics are
  treated as constants (jaxft only feeds them to running averages; the BatchNorm layer stops their
  gradient). With ``relu`` the backward pass recomputes the ReLU's mask from ``x``, so nothing beyond
  ``x`` and the statistics is kept for it. Returns new arrays; no input is mutated.
  """
  return _bn_forward(x, scale, shift, epsilon, relu)


def _bn_fwd(x, scale, shift, epsilon, relu):
  y, mean, var = _bn_forward(x, scale, shift, epsilon, relu)
  return (y, mean, var), (x, scale, shift, mean, var)


def _bn_bwd(epsilon, relu, res, cts):
  x, scale, shift, mean, var = res
  dy = cts[0].astype(x.dtype)  # the statistics' cotangents are dropped (see the docstring)
  vec = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
  dx, dscale, dshift = jax.ffi.ffi_call(
      _TARGETS["bn_bwd"], (jax.ShapeDtypeStruct(x.shape, x.dtype), vec, vec),
      vmap_method="sequential")(x, dy, scale.astype(jnp.float32), shift.astype(jnp.float32), mean, var,
                                epsilon=np.float32(epsilon), relu=np.int64(relu))
  return dx, dscale.astype(scale.dtype), dshift.astype(shift.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


# ---------------------------------------------------------------------------------------------------
# Max pooling (training), the gradient routed by oneDNN's argmax workspace
# ---------------------------------------------------------------------------------------------------


def pool_supported(x_shape: Sequence[int], dtype) -> bool:
  """Whether jaxft's CPU layers pool an array of this shape and type with :func:`max_pool`:
  bfloat16 only (float32 ResNet-50 training measured the same speed either way, 0.998×), where
  :func:`norm_supported`. :func:`max_pool` itself also takes float32."""
  return jnp.dtype(dtype) == jnp.bfloat16 and norm_supported(x_shape, dtype)


@functools.lru_cache(maxsize=None)
def _pool_workspace_bytes(shape: tuple[int, ...], bf16: bool, k: int, s: int, p: int) -> int:
  fn = _state["lib"].jaxft_onednn_pool_workspace_bytes
  fn.restype = ctypes.c_int64
  fn.argtypes = [ctypes.c_int64] * 8
  n = int(fn(*shape, int(bf16), k, s, p))
  if n < 0:
    raise OneDNNUnavailableError(f"oneDNN has no max pooling for {shape}")
  return max(n, 1)


def _pool_forward(x, k, s, p):
  if not loaded():
    raise OneDNNUnavailableError(f"oneDNN pooling is {status()}")
  n, h, w, c = x.shape
  y = jax.ShapeDtypeStruct((n, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, c), x.dtype)
  ws = jax.ShapeDtypeStruct(
      (_pool_workspace_bytes(tuple(x.shape), x.dtype == jnp.bfloat16, k, s, p),), jnp.uint8)
  return jax.ffi.ffi_call(_TARGETS["pool_fwd"], (y, ws), vmap_method="sequential")(
      x, k=np.int64(k), s=np.int64(s), p=np.int64(p))


def max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
  """k×k max-pool of NHWC ``x`` with stride ``s``, padded ``p`` on each side (padding never wins:
  torch's ``MaxPool2d(k, s, p)``), by oneDNN (check :func:`pool_supported` first). The gradient goes
  to the first maximal tap of each window, as torch's, and needs only oneDNN's argmax workspace
  (``x`` is not kept for it). Returns a new array; ``x`` is not mutated."""
  return _max_pool(x, k, s, p, x.shape[1], x.shape[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _max_pool(x, k, s, p, h, w):
  del h, w
  return _pool_forward(x, k, s, p)[0]


def _max_pool_fwd(x, k, s, p, h, w):
  del h, w
  return _pool_forward(x, k, s, p)


def _max_pool_bwd(k, s, p, h, w, ws, dy):
  n, _, _, c = dy.shape
  dx = jax.ffi.ffi_call(_TARGETS["pool_bwd"], jax.ShapeDtypeStruct((n, h, w, c), dy.dtype),
                        vmap_method="sequential")(dy, ws, k=np.int64(k), s=np.int64(s), p=np.int64(p))
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
