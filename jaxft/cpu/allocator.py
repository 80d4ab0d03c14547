"""The C allocator for running XLA:CPU fast: glibc's malloc tuning and tcmalloc.

:func:`jaxft.cpu.enable` calls :func:`retain_freed_memory` (``JAXFT_MALLOC_TUNING=0`` opts out) and,
with ``relaunch=True`` (the command-line entry points: ``python -m jaxft.train``, ``python -m
jaxft.evaluate``, ``tools/bench.py``'s jaxft worker), :func:`relaunch_with_tcmalloc` where the machine
has tcmalloc (``JAXFT_TCMALLOC=0`` opts out). Importing this module changes nothing. The measurements
are in docs/benchmarks.md ("Allocator", "tcmalloc for the command-line entry points").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
from typing import Mapping, Sequence

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def retain_freed_memory() -> bool:
  """Makes glibc's ``malloc`` reuse freed memory instead of handing it back to the kernel.

  XLA:CPU allocates the temporaries of each execution as one block (hundreds of MB to GB for a
  ResNet-50 step) and frees it when the step ends. glibc serves a block that large with ``mmap`` and
  unmaps it on ``free`` (or, in the per-thread arenas of XLA's worker threads, deletes a heap as soon as
  it is empty), so every step faults the whole block in again. With one arena, no ``mmap`` and no
  trimming of the heap top, freed blocks are reused (no faults per step after the first few). Other
  processes and non-glibc platforms are unaffected.

  Trade-off: memory freed by this process stays mapped for its lifetime (the way JAX's GPU allocator
  keeps device memory). Nothing leaks — freed blocks are reused — but the heap fragments until it
  settles (a higher peak RSS; docs/benchmarks.md, "Allocator"). Arenas already created by running
  threads keep their behaviour, so call this before the first computation (:func:`jaxft.cpu.enable`
  does).

  Returns:
    True when the settings were applied (Linux with glibc), False otherwise.
  """
  global _applied
  if _applied:
    return True
  if platform.system() != "Linux" or loaded_allocator() != "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _applied = ok
  return ok


# ---------------------------------------------------------------------------------------------------
# tcmalloc for the command-line entry points
# ---------------------------------------------------------------------------------------------------

MALLOC_TUNING_ENV = "JAXFT_MALLOC_TUNING"
"""``0``: :func:`jaxft.cpu.enable` leaves glibc's malloc settings alone."""

TCMALLOC_ENV = "JAXFT_TCMALLOC"
"""``0``: never relaunch under tcmalloc; a path: use that library instead of searching for one."""

_RELAUNCHED_ENV = "JAXFT_TCMALLOC_RELAUNCHED"
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so*", "libtcmalloc.so*")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/opt/homebrew/lib")


def find_tcmalloc(env: Mapping[str, str] | None = None) -> str | None:
  """Path of a tcmalloc shared library on this machine, or None.

  ``JAXFT_TCMALLOC`` in ``env`` (default: ``os.environ``) set to ``0`` gives None; set to an existing
  file gives that file. Otherwise the first ``libtcmalloc_minimal`` / ``libtcmalloc`` found in the
  environment's ``lib`` folder (conda, venv) or the system's library folders (Debian/Ubuntu:
  ``apt-get install libtcmalloc-minimal4``). Linux only. Nothing is loaded.
  """
  env = os.environ if env is None else env
  choice = env.get(TCMALLOC_ENV, "")
  if choice == "0" or platform.system() != "Linux":
    return None
  if choice:
    return os.path.abspath(choice) if _is_elf(choice) else None
  for d in (os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib"), *_LIB_DIRS):
    for pattern in _TCMALLOC_NAMES:
      hits = [h for h in sorted(glob.glob(os.path.join(d, pattern))) if _is_elf(h)]
      if hits:
        return hits[0]
  return None


def _is_elf(path: str) -> bool:
  """Whether ``path`` is a file that starts like a shared library (so ``ld.so`` will not print an
  error for it in this process and every child that inherits ``LD_PRELOAD``)."""
  try:
    with open(path, "rb") as f:
      return f.read(4) == b"\x7fELF"
  except OSError:
    return False


def loaded_allocator() -> str:
  """``"tcmalloc"`` or ``"jemalloc"`` when that allocator is mapped into this process (e.g. through
  ``LD_PRELOAD``), else ``"glibc"`` on Linux and ``"system"`` elsewhere."""
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      maps = f.read()
  except OSError:
    return "system"
  for name in ("tcmalloc", "jemalloc"):
    if f"lib{name}" in maps:
      return name
  return "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def _preloads(env: Mapping[str, str]) -> list[str]:
  """The entries of ``env``'s ``LD_PRELOAD`` (colon- or space-separated, as ``ld.so`` reads it)."""
  return [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]


def tcmalloc_env(env: Mapping[str, str], library: str) -> dict[str, str]:
  """A copy of ``env`` whose ``LD_PRELOAD`` starts with ``library`` (once); ``env`` is not mutated."""
  out = dict(env)
  out["LD_PRELOAD"] = ":".join([library, *(p for p in _preloads(env) if p != library)])
  return out


def without_tcmalloc(env: Mapping[str, str]) -> dict[str, str]:
  """A copy of ``env`` whose ``LD_PRELOAD`` names no tcmalloc library; ``env`` is not mutated."""
  out = dict(env)
  rest = [p for p in _preloads(env) if "tcmalloc" not in os.path.basename(p)]
  if rest:
    out["LD_PRELOAD"] = ":".join(rest)
  else:
    out.pop("LD_PRELOAD", None)
  return out


def relaunch_with_tcmalloc(argv: Sequence[str] | None = None) -> None:
  """Replaces this process with ``argv`` (an ``execv`` argument list) run under tcmalloc.

  ``argv`` defaults to this process's own command line (``sys.executable`` followed by
  ``sys.orig_argv[1:]``), so interpreter options and wrappers (``python -X dev -m …``, ``python -m
  cProfile … -m …``, ``coverage run -m …``) survive the relaunch. Does nothing, and returns, when
  this process already runs another allocator than glibc's (tcmalloc, or a user's jemalloc), when
  :func:`find_tcmalloc` finds none (or ``JAXFT_TCMALLOC=0``), or when this process is itself such a
  relaunch. Otherwise it does not return: the new process starts from scratch with the same
  arguments and environment, plus ``LD_PRELOAD``. Call it first thing in a ``__main__`` block, before
  any output or threads.

  Why: XLA:CPU's convolutions call oneDNN's GEMM, which allocates a workspace on every call, and XLA
  frees and re-allocates each step's temporaries; tcmalloc serves both from per-thread caches where
  glibc walks the bins of one large heap (faster steps and compilation in interleaved A/B runs:
  docs/benchmarks.md, "Fourth session"). If the relaunch itself fails (``argv[0]`` not executable),
  this process goes on with its allocator.
  """
  if argv is None:
    argv = [sys.executable, *getattr(sys, "orig_argv", sys.argv)[1:]]
  if (not argv or not argv[0] or os.environ.get(_RELAUNCHED_ENV) == "1"
      or loaded_allocator() != "glibc"):
    return
  library = find_tcmalloc()
  if library is None:
    return
  env = tcmalloc_env(os.environ, library)
  env[_RELAUNCHED_ENV] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(argv[0], list(argv), env)
  except OSError:
    return
