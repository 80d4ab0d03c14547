"""jaxft.cpu.allocator: glibc keeps freed blocks for reuse; the CLIs relaunch under tcmalloc."""

import os
import platform
import subprocess
import sys

import pytest

_CHURN = r"""
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "tuned":
  from jaxft.cpu import allocator
  assert allocator.retain_freed_memory()
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
  env = dict(os.environ)
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


# --- tcmalloc for the command-line entry points ----------------------------------------------------

_RELAUNCH = r"""
import os, sys
from jaxft.cpu import allocator
allocator.relaunch_with_tcmalloc()  # this script, same interpreter options and arguments
assert sys.flags.dont_write_bytecode  # -B survived the relaunch
print(allocator.loaded_allocator(), os.environ.get("LD_PRELOAD", ""), *sys.argv[1:])
"""


def _clean_env() -> dict[str, str]:
  """This process's environment without any allocator choice, importing this checkout's jaxft (the
  scripts and working directories of these tests lie outside the repository)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "JAXFT_TCMALLOC", "JAXFT_TCMALLOC_RELAUNCHED")}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  return env


def _relaunched(tmp_path, env: dict[str, str]) -> list[str]:
  script = tmp_path / "relaunch.py"
  script.write_text(_RELAUNCH)
  env = {**_clean_env(), **env}
  out = subprocess.run([sys.executable, "-B", str(script), "arg1", "--flag=2"], env=env,
                       capture_output=True, text=True, check=True, timeout=120)
  return out.stdout.split()


def test_tcmalloc_env_prepends_once_and_leaves_the_input_alone():
  from jaxft.cpu import allocator
  env = {"LD_PRELOAD": "/a/other.so:/t/libtcmalloc.so", "X": "1"}
  out = allocator.tcmalloc_env(env, "/t/libtcmalloc.so")
  assert out == {"LD_PRELOAD": "/t/libtcmalloc.so:/a/other.so", "X": "1"}
  assert env == {"LD_PRELOAD": "/a/other.so:/t/libtcmalloc.so", "X": "1"}
  assert allocator.tcmalloc_env({}, "/t/libtcmalloc.so") == {"LD_PRELOAD": "/t/libtcmalloc.so"}
  assert allocator.without_tcmalloc(out) == {"LD_PRELOAD": "/a/other.so", "X": "1"}
  assert allocator.without_tcmalloc({"LD_PRELOAD": "/t/libtcmalloc_minimal.so.4"}) == {}
  assert out == {"LD_PRELOAD": "/t/libtcmalloc.so:/a/other.so", "X": "1"}


def test_find_tcmalloc_obeys_the_environment(tmp_path):
  from jaxft.cpu import allocator
  assert allocator.find_tcmalloc({"JAXFT_TCMALLOC": "0"}) is None
  assert allocator.find_tcmalloc({"JAXFT_TCMALLOC": str(tmp_path / "missing.so")}) is None
  not_a_library = tmp_path / "notes.txt"
  not_a_library.write_text("hello")  # ld.so would print an error for it in every child process
  assert allocator.find_tcmalloc({"JAXFT_TCMALLOC": str(not_a_library)}) is None
  lib = tmp_path / "libtcmalloc_minimal.so.4"
  lib.write_bytes(b"\x7fELF" + bytes(60))
  expected = str(lib) if platform.system() == "Linux" else None
  assert allocator.find_tcmalloc({"JAXFT_TCMALLOC": str(lib)}) == expected


@pytest.mark.skipif(platform.system() != "Linux", reason="LD_PRELOAD: Linux only")
def test_relaunch_runs_the_same_command_under_tcmalloc_or_not_at_all(tmp_path):
  from jaxft.cpu import allocator
  # Opted out: the script runs once, in place, with glibc's malloc.
  assert _relaunched(tmp_path, {"JAXFT_TCMALLOC": "0"}) == ["glibc", "arg1", "--flag=2"]
  library = allocator.find_tcmalloc({})
  if library is None:
    pytest.skip("no tcmalloc on this machine (.ci/run installs libtcmalloc-minimal4)")
  # Relaunched once (no loop), same arguments, tcmalloc mapped in.
  assert _relaunched(tmp_path, {}) == ["tcmalloc", library, "arg1", "--flag=2"]


def test_relaunch_that_cannot_start_returns_instead(tmp_path, monkeypatch):
  from jaxft.cpu import allocator
  lib = tmp_path / "libtcmalloc_minimal.so.4"
  lib.write_bytes(b"\x7fELF" + bytes(60))
  monkeypatch.setenv("JAXFT_TCMALLOC", str(lib))
  monkeypatch.delenv("JAXFT_TCMALLOC_RELAUNCHED", raising=False)
  allocator.relaunch_with_tcmalloc([str(tmp_path / "no-such-python"), "-c", "pass"])  # returns
  allocator.relaunch_with_tcmalloc([])
  assert "JAXFT_TCMALLOC_RELAUNCHED" not in os.environ


@pytest.mark.parametrize("argv", [
    ("-m", "jaxft.train", "--help"),
    ("-m", "jaxft.evaluate", "--checkpoint", "missing", "--data", "folder:missing"),
    ("-m", "jaxft.sweep", "--worker=0", "--help"),
], ids=["train", "evaluate", "sweep-worker"])
def test_the_clis_relaunch_before_they_import_jax(argv, tmp_path):
  # What the first process imports before its exec is paid again by the relaunched one (JAX and orbax:
  # ~1.7 s of every CLI run).
  from jaxft.cpu import allocator
  if allocator.find_tcmalloc({}) is None:
    pytest.skip("no tcmalloc on this machine (.ci/run installs libtcmalloc-minimal4)")
  r = subprocess.run([sys.executable, "-X", "importtime", *argv], env=_clean_env(), cwd=tmp_path,
                     capture_output=True, text=True, timeout=300)
  imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
              if line.startswith("import time:")]
  assert imported.count("encodings") == 2, "expected one relaunch (two interpreter starts)"
  assert imported.count("jax") == 1, "JAX was imported before the relaunch too"


def test_metric_writer_leaves_torch_unimported_and_importable(tmp_path):
  # tensorboardX imports torch where installed (1.3 s, ~300 MB per training run) for annotations only.
  pytest.importorskip("tensorboardX")
  torch_installed = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
  code = ("import sys\n"
          "from jaxft import report\n"
          "w = report.MetricWriter(sys.argv[1])\n"
          "w.write(1, 'train', {'loss': 0.5}); w.close()\n"
          "print('torch' in sys.modules)\n"
          "import torch\n"  # unaffected afterwards
          "print(torch.tensor([2.0]).item())\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_clean_env(),
                     capture_output=True, text=True, timeout=300)
  if not torch_installed:
    assert "No module named 'torch'" in r.stderr
    return
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["False", "2.0"]
  assert [p.name for p in (tmp_path / "tensorboard").iterdir()]  # the event file was written
