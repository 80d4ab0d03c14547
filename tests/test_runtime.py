"""jaxft.runtime.retain_freed_memory: freed blocks are reused instead of faulted in again."""

import os
import platform
import subprocess
import sys

import pytest

_CHURN = r"""
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "tuned":
  from jaxft import runtime
  assert runtime.retain_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = int(sys.argv[2])
faults = []
for _ in range(3):  # what a train step does: allocate a big block, touch it, free it
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(*faults)
"""


def _faults(mode: str, size: int) -> list[int]:
  env = dict(os.environ, JAXFT_MALLOC_TUNING="1" if mode == "tuned" else "0")
  out = subprocess.run([sys.executable, "-c", _CHURN, mode, str(size)], env=env, capture_output=True,
                       text=True, check=True, timeout=120)
  return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
# 256 MB: an XLA:CPU step's temporaries at 32 px; 2.25 GB: above any int-sized trim threshold (224 px).
@pytest.mark.parametrize("size", [256 << 20, 2304 << 20], ids=["256MB", "2.25GB"])
def test_freed_blocks_are_reused_instead_of_faulted_in_again(size):
  pages = size // os.sysconf("SC_PAGE_SIZE")
  plain, tuned = _faults("plain", size), _faults("tuned", size)
  # glibc's default: a block this large is mmap-ed and unmapped on free, so every round faults it anew.
  assert min(plain) > pages // 2, plain
  # tuned: only the first round touches new memory; later rounds reuse the freed heap block.
  assert tuned[0] > pages // 2, tuned
  assert max(tuned[1:]) < pages // 20, tuned
