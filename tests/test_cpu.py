"""jaxft.cpu: importing jaxft changes nothing; tracing builds nothing; enable() is the one switch."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.cpu import allocator, clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, cache, *args: str, **env: str) -> subprocess.CompletedProcess:
  """Runs ``python -c code`` (or ``python -m`` when ``code`` starts with ``-m ``) from the repository
  root with a fresh native cache, no XLA_FLAGS and no tcmalloc relaunch, plus ``env``."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "JAXFT_CPU_FLAGS", "JAXFT_MALLOC_TUNING", "LD_PRELOAD",
                       "JAXFT_TCMALLOC_RELAUNCHED")}
  base.update({"JAXFT_NATIVE_CACHE_DIR": str(cache), "JAXFT_TCMALLOC": "0", **env})
  cmd = [sys.executable, *(code.split() if code.startswith("-m ") else ["-c", code]), *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_import_changes_no_environment_and_no_allocator(tmp_path):
  _run("import os, jaxft, jaxft.train, jaxft.surgery, jaxft.checkpoint, jaxft.convert, jaxft.cpu\n"
       "from jaxft.cpu import allocator\n"
       "assert 'XLA_FLAGS' not in os.environ\n"
       "assert not allocator._applied and not jaxft.cpu.enabled()\n"
       "assert jaxft.create_model is jaxft.models.create_model and 'Model' in dir(jaxft)\n",
       tmp_path / "cache")
  assert not (tmp_path / "cache").exists()


_TRACE = r"""
import os, sys
import jax, jax.numpy as jnp
import jaxft.cpu
from jaxft import models
from jaxft.cpu.layers import cpu_layers

model = models.create_model("resnet50", jax.random.key(0), num_classes=10)
x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
assert jaxft.cpu.network_layers() == models.Layers()  # not enabled: the plain layers
for layers in (models.Layers(), cpu_layers("auto")):  # the CPU layers' "auto" must not build either
  net = models.Network(model.spec, layers=layers)
  jax.jit(lambda v, x: net.apply(v, x)).lower(model.variables, x)

  def loss(params, x):
    out, _ = net.apply({**model.variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return out.sum()

  jax.jit(jax.grad(loss)).lower(model.params, x)
  jax.eval_shape(lambda x: net.init(jax.random.key(0), x), x)
models.abstract_variables(model.spec)
assert "XLA_FLAGS" not in os.environ
cache = os.environ["JAXFT_NATIVE_CACHE_DIR"]
assert not os.path.exists(cache) or os.listdir(cache) == [], os.listdir(cache)
print(jaxft.cpu.status())
"""


def test_creating_tracing_and_eval_shape_of_resnet50_build_nothing(tmp_path):
  out = _run(_TRACE, tmp_path / "cache").stdout
  assert "jaxft.cpu not enabled" in out and "XLA_FLAGS unset" in out
  assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


_ENABLE = r"""
import json, os
import jaxft.cpu
jaxft.cpu.enable()
from jaxft.cpu import allocator, clip, layers, onednn
print(json.dumps({"loaded": onednn.loaded(), "flags": os.environ.get("XLA_FLAGS"),
                  "malloc": allocator._applied, "enabled": jaxft.cpu.enabled(),
                  "cpu_layers": jaxft.cpu.network_layers() is layers.cpu_layers("auto"),
                  "gemv_norms": jaxft.cpu.norm_functions() == (clip.global_norm, clip.clip_by_global_norm),
                  "status": jaxft.cpu.status()}))
"""


def test_enable_builds_into_the_cache_and_switches_the_layers(tmp_path):
  if os.environ.get("JAXFT_ONEDNN") == "0":
    pytest.skip("JAXFT_ONEDNN=0")
  cache = tmp_path / "cache"
  got = json.loads(_run(_ENABLE, cache).stdout.splitlines()[-1])
  if not got["loaded"]:  # JAXFT_ONEDNN=1 (CI) would have made enable() fail instead
    pytest.skip(f"oneDNN does not build here: {got['status']}")
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].startswith("libjaxft_onednn-") and files[0].endswith(".so")
  assert got["enabled"] and got["cpu_layers"] and got["gemv_norms"] and got["flags"] == (
      "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert "oneDNN convolutions oneDNN " in got["status"] and str(cache) in got["status"]
  # The command line: status reports the cached library, build finds it cached.
  status = _run("-m jaxft.cpu status", cache).stdout
  assert "jaxft.cpu not enabled" in status and "(built; jaxft.cpu.enable() loads it)" in status
  built = _run("-m jaxft.cpu build", cache).stdout
  assert built.strip() == f"built {cache / files[0]}"
  assert os.listdir(cache) == files


_USER_FLAGS = "--xla_cpu_enable_fast_math=false"


def test_enable_obeys_the_opt_outs(tmp_path):
  cache = tmp_path / "cache"
  off = dict(JAXFT_ONEDNN="0", JAXFT_CPU_FLAGS="0", JAXFT_MALLOC_TUNING="0")
  got = json.loads(_run(_ENABLE, cache, **off).stdout.splitlines()[-1])
  assert got["flags"] is None and not got["malloc"] and not got["loaded"]
  assert got["enabled"] and got["cpu_layers"]  # the CPU layers still, with XLA's convolutions
  assert "oneDNN convolutions off (JAXFT_ONEDNN=0)" in got["status"]
  # The user's own XLA_FLAGS are never touched.
  got = json.loads(_run(_ENABLE, cache, JAXFT_ONEDNN="0", XLA_FLAGS=_USER_FLAGS).stdout
                   .splitlines()[-1])
  assert got["flags"] == _USER_FLAGS
  glibc = sys.platform.startswith("linux") and allocator.loaded_allocator() == "glibc"
  got = json.loads(_run(_ENABLE, cache, JAXFT_ONEDNN="0").stdout.splitlines()[-1])
  assert got["flags"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert got["malloc"] == glibc
  assert not cache.exists()
  assert _run("-m jaxft.cpu build", cache, JAXFT_ONEDNN="0").stdout.strip() == (
      "oneDNN convolutions off (JAXFT_ONEDNN=0): nothing built")


def test_enable_relaunches_under_tcmalloc_only_when_asked(tmp_path):
  library = allocator.find_tcmalloc({})
  if library is None:
    pytest.skip("no tcmalloc on this machine (.ci/run installs libtcmalloc-minimal4)")
  code = ("import jaxft.cpu; jaxft.cpu.enable(relaunch={}); "
          "from jaxft.cpu import allocator; print(allocator.loaded_allocator())")
  no = dict(JAXFT_ONEDNN="0")
  assert _run(code.format(False), tmp_path, **no).stdout.split() == ["glibc"]
  assert _run(code.format(True), tmp_path, **no, JAXFT_TCMALLOC="").stdout.split() == ["tcmalloc"]


def test_gemv_global_norm_and_clip_match_optax():
  r = np.random.default_rng(0)
  tree = {"k": jnp.asarray(r.normal(size=(3, 3, 16, 128)), jnp.float32),
          "b": jnp.asarray(r.normal(size=(7,)), jnp.float32), "s": jnp.float32(2.0)}
  np.testing.assert_allclose(clip.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)
  for max_norm in (1.0, 1e6):  # clipped, and left alone
    ours, theirs = clip.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    got, st = ours.update(tree, ours.init(tree))
    want, st_want = theirs.update(tree, theirs.init(tree))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert jax.tree.structure(st) == jax.tree.structure(st_want)
    np.testing.assert_allclose(clip.global_norm(got), min(max_norm, optax.tree.norm(tree)), rtol=1e-5)


def test_docstring_examples_run():
  import doctest  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(clip)
  assert result.attempted >= 1 and result.failed == 0


def test_without_enable_the_norms_and_layers_are_optax_and_plain():
  import optax  # pylint: disable=g-import-not-at-top
  import jaxft.cpu  # pylint: disable=g-import-not-at-top
  from jaxft.models.layers import Layers  # pylint: disable=g-import-not-at-top
  assert not jaxft.cpu.enabled()  # nothing in the test process switches the backend on
  assert jaxft.cpu.norm_functions() == (optax.tree.norm, optax.clip_by_global_norm)
  assert jaxft.cpu.network_layers() == Layers()
