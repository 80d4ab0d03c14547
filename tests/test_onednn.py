"""oneDNN convolutions (jaxft.cpu.onednn): values and both gradients equal ``lax.conv``; the
automatic choice uses them once loaded; without oneDNN everything falls back or fails with one clear
error; building is an explicit step."""

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxft.cpu import onednn
from jaxft.cpu.impl import resolve_impl
from jaxft.cpu.layers import Conv


@pytest.fixture
def needs_onednn():
  """Skips where oneDNN cannot be used here (no library, or not a CPU backend); with JAXFT_ONEDNN=1
  (CI) a build failure is this test's error instead."""
  if jax.default_backend() != "cpu":
    pytest.skip("oneDNN convolutions are for the CPU backend")
  if not onednn.load():
    pytest.skip(f"oneDNN {onednn.status()}")


def _lax(x, w, strides, padding, groups=1):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


# (batch, h, w, cin, cout, kernel (kh, kw), strides, padding): 1×1 / 3×3 / 7×7, strides 1 and 2,
# odd, even and rectangular maps, no padding, asymmetric padding, a non-square kernel and stride.
CASES = [
    (2, 5, 5, 4, 6, (1, 1), (1, 1), ((0, 0), (0, 0))),
    (2, 6, 6, 4, 6, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (3, 7, 5, 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 8, 8, 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 8, 8, 4, 6, (3, 3), (2, 2), ((0, 1), (1, 0))),
    (1, 6, 6, 2, 3, (3, 3), (1, 1), ((0, 0), (0, 0))),
    (2, 11, 9, 3, 8, (7, 7), (2, 2), ((3, 3), (3, 3))),
    (2, 9, 10, 5, 4, (3, 1), (2, 1), ((1, 1), (0, 0))),
    # channels that oneDNN's 16-wide blocked layouts must pad (kernel and kernel-gradient reorders)
    (2, 6, 6, 20, 36, (3, 3), (1, 1), ((1, 1), (1, 1))),
]
# The same with feature groups: depthwise (3×3 and 5×5, strides 1 and 2, 20 channels: padded blocks),
# a channel multiplier of 2, and 3 groups of 2 → 3 channels.
GROUPED = [
    (2, 9, 9, 20, 20, (3, 3), (1, 1), ((1, 1), (1, 1)), 20),
    (2, 10, 9, 20, 20, (5, 5), (2, 2), ((2, 2), (2, 2)), 20),
    (2, 7, 7, 4, 8, (3, 3), (2, 2), ((1, 0), (0, 1)), 4),
    (2, 8, 8, 6, 9, (3, 3), (1, 1), ((1, 1), (1, 1)), 3),
]


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("n,h,w,cin,cout,khw,strides,padding,groups",
                         [(*c, 1) for c in CASES] + GROUPED)
def test_conv_matches_lax_values_and_gradients(n, h, w, cin, cout, khw, strides, padding, groups):
  r = np.random.default_rng(h * 100 + cin)
  x = jnp.asarray(r.normal(size=(n, h, w, cin)), jnp.float32)
  k = jnp.asarray(r.normal(size=(*khw, cin // groups, cout)), jnp.float32)
  ct = jnp.asarray(r.normal(size=_lax(x, k, strides, padding, groups).shape), jnp.float32)

  def vjp(f, x, k, ct):
    y, pull = jax.vjp(lambda x, k: f(x, k, strides, padding, groups), x, k)
    return (y, *pull(ct))

  x_before, k_before = np.asarray(x).copy(), np.asarray(k).copy()
  # Arrays as arguments, not closed over (constants would be copies): the custom calls read these.
  got = jax.jit(lambda x, k, ct: vjp(onednn.conv, x, k, ct))(x, k, ct)
  want = jax.jit(lambda x, k, ct: vjp(_lax, x, k, ct))(x, k, ct)
  for g, e, name in zip(got, want, ("output", "input gradient", "kernel gradient")):
    assert g.shape == e.shape, name
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)
  np.testing.assert_array_equal(x, x_before)  # inputs are never written
  np.testing.assert_array_equal(k, k_before)


@pytest.mark.usefixtures("needs_onednn")
def test_conv_under_vmap_and_second_call_with_a_new_geometry():
  r = np.random.default_rng(0)
  xs = jnp.asarray(r.normal(size=(3, 2, 6, 6, 4)), jnp.float32)
  k = jnp.asarray(r.normal(size=(3, 3, 4, 5)), jnp.float32)
  pad = ((1, 1), (1, 1))
  got = jax.vmap(lambda x: onednn.conv(x, k, (1, 1), pad))(xs)
  want = jax.vmap(lambda x: _lax(x, k, (1, 1), pad))(xs)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("needs_onednn")
def test_auto_takes_onednn_only_where_this_cpu_prefers_it(monkeypatch):
  # AVX2-only CPUs run XLA's plans faster than oneDNN 2.6's AVX2 kernels (docs/benchmarks.md); the
  # suite forces JAXFT_ONEDNN_AUTO=1 (conftest) so that it exercises oneDNN everywhere.
  import jaxft.cpu  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("JAXFT_ONEDNN_AUTO")
  assert onednn.preferred() == ("avx512f" in onednn.cpu_flags())
  monkeypatch.setenv("JAXFT_ONEDNN_AUTO", "0")
  assert not onednn.preferred()
  assert resolve_impl("auto", 10**6) == "hybrid"
  assert resolve_impl("onednn", 10**6) == "onednn"  # an explicit choice is unaffected
  assert "not chosen by impl='auto' on this CPU" in jaxft.cpu.status()
  monkeypatch.setenv("JAXFT_ONEDNN_AUTO", "1")
  assert resolve_impl("auto", 10**6) == "onednn"
  assert "not chosen" not in jaxft.cpu.status()


@pytest.mark.usefixtures("needs_onednn")
def test_auto_uses_onednn_on_large_maps_and_gemms_on_tiny_ones():
  module = Conv(8, (3, 3), padding=((1, 1), (1, 1)))
  big, tiny = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 2, 2, 4))
  v = module.init(jax.random.key(0), big)
  hlo = lambda x: jax.jit(jax.value_and_grad(lambda v, x: module.apply(v, x).sum())).lower(
      v, x).as_text()
  big_hlo, tiny_hlo = hlo(big), hlo(tiny)
  for target in ("jaxft_onednn_conv_fwd", "jaxft_onednn_conv_bwd_weights"):
    assert target in big_hlo
    assert target not in tiny_hlo


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("groups,impl,dtype,expect", [
    (1, "auto", jnp.float32, "onednn"),
    (8, "auto", jnp.float32, "onednn"),      # depthwise
    # bfloat16 depthwise: oneDNN where the CPU has bfloat16 instructions, else shifted products
    (8, "auto", jnp.bfloat16, "onednn" if onednn.bf16_supported() else "shifted"),
    (2, "auto", jnp.float32, "lax"),         # other grouped convs: oneDNN only when asked
    (2, "onednn", jnp.float32, "onednn"),
])
def test_grouped_and_depthwise_routing(groups, impl, dtype, expect):
  module = Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=groups, impl=impl,
                     dtype=dtype)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 6, 8)), jnp.float32)
  v = module.init(jax.random.key(0), x)
  text = jax.jit(lambda v, x: module.apply(v, x)).lower(v, x).as_text()
  assert ("jaxft_onednn_conv_fwd" in text) == (expect == "onednn")
  assert ("stablehlo.convolution" in text) == (expect == "lax")
  want = lax.conv_general_dilated(x, v["params"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(module.apply(v, x), np.float32), want, rtol=tol, atol=tol)


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_module_onednn_equals_lax_and_takes_bfloat16_where_the_cpu_has_it(dtype):
  kw = dict(features=6, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=dtype)
  fast, plain = Conv(impl="onednn", **kw), Conv(impl="lax", **kw)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, 3)), jnp.float32)
  v = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  lowered = jax.jit(fast.apply).lower(v, x).as_text()
  assert ("jaxft_onednn_conv_fwd" in lowered) == (dtype == jnp.float32 or onednn.bf16_supported())
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(fast.apply(v, x), np.float32),
                             np.asarray(plain.apply(v, x), np.float32), rtol=tol, atol=tol)


@pytest.mark.usefixtures("needs_onednn")
def test_one_primitive_run_from_four_threads_at_once():
  # XLA runs independent custom calls concurrently and callers may run one jitted function from
  # several threads. The library runs one oneDNN call at a time (a lock) and gives each call its own
  # scratchpad; this is the smoke test that results stay right and nothing deadlocks.
  r = np.random.default_rng(3)
  x = jnp.asarray(r.normal(size=(4, 20, 20, 24)), jnp.float32)
  k = jnp.asarray(r.normal(size=(3, 3, 24, 24)) * 0.1, jnp.float32)
  pad = ((1, 1), (1, 1))
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(onednn.conv(x, k, (1, 1), pad) ** 2), (0, 1)))
  want = jax.jit(jax.grad(lambda x, k: jnp.sum(_lax(x, k, (1, 1), pad) ** 2), (0, 1)))(x, k)
  step(x, k)  # compiled and the primitives built before the threads start
  results, errors = [None] * 4, []

  def run(i):
    try:
      results[i] = [step(x, k) for _ in range(3)]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  for per_thread in results:
    for got in per_thread:
      for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


@pytest.mark.usefixtures("needs_onednn")
def test_mismatched_shapes_are_an_error_not_a_wild_write():
  dy, k = jnp.ones((2, 4, 4, 6)), jnp.ones((3, 3, 5, 6))
  with pytest.raises(Exception, match="do not describe one convolution"):
    # x would be [2, 8, 8, 5] at stride 2: [2, 9, 9, 5] does not match dy.
    jax.block_until_ready(onednn.input_grad(dy, k, (2, 9, 9, 5), (1, 1), ((1, 1), (1, 1))))
  with pytest.raises(Exception, match="groups must divide"):
    jax.block_until_ready(onednn.forward(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 1, 6)), (1, 1),
                                         ((1, 1), (1, 1)), groups=4))
  with pytest.raises(Exception, match="do not describe one convolution"):
    jax.block_until_ready(onednn.forward(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 4, 6)), (1, 1),
                                         ((1, 1), (1, 1)), groups=2))
  with pytest.raises(ValueError, match="take float32 or bfloat16 arrays, got float16"):
    onednn.forward(jnp.ones((1, 4, 4, 5), jnp.float16), k, (1, 1), ((1, 1), (1, 1)))


def test_supported_rejects_what_onednn_cannot_compute():
  ok = dict(x_shape=(2, 8, 8, 4), kernel_shape=(3, 3, 4, 6), dtype=jnp.float32, strides=(1, 1),
            padding=((1, 1), (1, 1)))
  cpu_alone = jax.default_backend() == "cpu" and jax.device_count() == 1
  assert onednn.supported(**ok) == (cpu_alone and onednn.loaded())
  assert onednn.supported(**{**ok, "dtype": jnp.bfloat16}) == (
      cpu_alone and onednn.loaded() and onednn.bf16_supported())
  assert not onednn.supported(**{**ok, "dtype": jnp.float16})
  assert onednn.supported(**{**ok, "kernel_shape": (3, 3, 2, 6)}, groups=2) == (
      cpu_alone and onednn.loaded())
  assert not onednn.supported(**ok, groups=2)  # kernel has 4 input channels, not 4 / 2
  assert not onednn.supported(**{**ok, "kernel_shape": (3, 3, 1, 6)}, groups=4)  # 6 % 4
  assert not onednn.supported(**{**ok, "padding": ((-1, 1), (1, 1))})
  assert not onednn.supported(**{**ok, "padding": ((1, 1, 1), (1, 1))})
  assert not onednn.supported(**{**ok, "kernel_shape": (0, 3, 4, 6)})
  assert not onednn.supported(**{**ok, "kernel_shape": (3, 3, 5, 6)})
  assert not onednn.supported(**{**ok, "x_shape": (0, 8, 8, 4)})  # empty batch
  assert not onednn.supported(**{**ok, "x_shape": (2, 1, 1, 4), "padding": ((0, 0), (0, 0))})


@pytest.fixture
def no_onednn(monkeypatch):
  """oneDNN as if building it had failed."""
  monkeypatch.setattr(onednn, "_state", {"error": "RuntimeError: no compiler (test)"})


def test_without_onednn_auto_falls_back_and_explicit_choice_fails_clearly(no_onednn, monkeypatch):
  monkeypatch.delenv("JAXFT_ONEDNN", raising=False)
  assert not onednn.load() and not onednn.loaded()
  assert onednn.status() == "unavailable (RuntimeError: no compiler (test))"
  if jax.default_backend() == "cpu":
    assert resolve_impl("auto", 10**6) == "hybrid"
  module = Conv(4, (3, 3), padding=((1, 1), (1, 1)), impl="onednn")
  with pytest.raises(onednn.OneDNNUnavailableError,
                     match=r"conv impl 'onednn' but oneDNN is unavailable \(RuntimeError: no "):
    module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  monkeypatch.setenv("JAXFT_ONEDNN", "1")  # CI: must not silently fall back
  with pytest.raises(onednn.OneDNNUnavailableError, match="JAXFT_ONEDNN=1 but oneDNN"):
    onednn.load()
  monkeypatch.setenv("JAXFT_ONEDNN", "0")
  assert not onednn.load() and onednn.status() == "off (JAXFT_ONEDNN=0)"


def test_build_failure_names_the_fix_and_leaves_no_file(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_NATIVE_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a compiler that always fails
  with pytest.raises(RuntimeError, match="apt-get install libdnnl-dev"):
    onednn.build()
  assert os.listdir(tmp_path) == []
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="cannot run the C\\+\\+ compiler"):
    onednn.build()
  assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("needs_onednn")
def test_build_writes_the_library_into_the_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_NATIVE_CACHE_DIR", str(tmp_path))
  path = onednn.build()
  assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith(
      "libjaxft_onednn-")
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
  assert onednn.build() == path  # cached: not rebuilt


def test_nothing_is_built_or_loaded_before_the_explicit_step(tmp_path, monkeypatch):
  # A fresh process state (as before jaxft.cpu.enable()): the questions asked while tracing answer
  # "no" and build nothing; an explicit impl="onednn" fails naming the fix.
  monkeypatch.setattr(onednn, "_state", {})
  monkeypatch.setenv("JAXFT_NATIVE_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("JAXFT_ONEDNN", raising=False)
  assert not onednn.loaded()
  assert onednn.status() == "not loaded (not built; jaxft.cpu.enable() loads it)"
  assert not onednn.supported((2, 8, 8, 4), (3, 3, 4, 6), jnp.float32, (1, 1), ((1, 1), (1, 1)))
  if jax.default_backend() == "cpu":
    assert resolve_impl("auto", 10**6) == "hybrid"
    module = Conv(4, (3, 3), padding=((1, 1), (1, 1)), impl="onednn")
    with pytest.raises(onednn.OneDNNUnavailableError, match=r"oneDNN is not loaded \(not built; "):
      jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  with pytest.raises(onednn.OneDNNUnavailableError, match="oneDNN convolutions are not loaded"):
    onednn.forward(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 4, 6)), (1, 1), ((1, 1), (1, 1)))
  assert os.listdir(tmp_path) == []
