"""oneDNN convolutions (jaxft.models.onednn): values and both gradients equal ``lax.conv``; the
automatic choice uses them; without oneDNN everything falls back or fails with one clear error."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxft.models import conv, onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN {onednn.status()}")


def _lax(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


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
]


@needs_onednn
@pytest.mark.parametrize("n,h,w,cin,cout,khw,strides,padding", CASES)
def test_conv_matches_lax_values_and_gradients(n, h, w, cin, cout, khw, strides, padding):
  r = np.random.default_rng(h * 100 + cin)
  x = jnp.asarray(r.normal(size=(n, h, w, cin)), jnp.float32)
  k = jnp.asarray(r.normal(size=(*khw, cin, cout)), jnp.float32)
  ct = jnp.asarray(r.normal(size=_lax(x, k, strides, padding).shape), jnp.float32)

  def vjp(f):
    y, pull = jax.vjp(lambda x, k: f(x, k, strides, padding), x, k)
    return (y, *pull(ct))

  x_before, k_before = np.asarray(x).copy(), np.asarray(k).copy()
  got, want = jax.jit(lambda: vjp(onednn.conv))(), jax.jit(lambda: vjp(_lax))()
  for g, e, name in zip(got, want, ("output", "input gradient", "kernel gradient")):
    assert g.shape == e.shape, name
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)
  np.testing.assert_array_equal(x, x_before)  # inputs are never written
  np.testing.assert_array_equal(k, k_before)


@needs_onednn
def test_conv_under_vmap_and_second_call_with_a_new_geometry():
  r = np.random.default_rng(0)
  xs = jnp.asarray(r.normal(size=(3, 2, 6, 6, 4)), jnp.float32)
  k = jnp.asarray(r.normal(size=(3, 3, 4, 5)), jnp.float32)
  pad = ((1, 1), (1, 1))
  got = jax.vmap(lambda x: onednn.conv(x, k, (1, 1), pad))(xs)
  want = jax.vmap(lambda x: _lax(x, k, (1, 1), pad))(xs)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_auto_uses_onednn_on_large_maps_and_gemms_on_tiny_ones():
  module = conv.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
  big, tiny = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 2, 2, 4))
  v = module.init(jax.random.key(0), big)
  hlo = lambda x: jax.jit(jax.value_and_grad(lambda v, x: module.apply(v, x).sum())).lower(
      v, x).as_text()
  big_hlo, tiny_hlo = hlo(big), hlo(tiny)
  for target in ("jaxft_onednn_conv_fwd", "jaxft_onednn_conv_bwd_weights"):
    assert target in big_hlo
    assert target not in tiny_hlo


@needs_onednn
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_module_onednn_equals_lax_and_falls_back_for_bfloat16(dtype):
  kw = dict(features=6, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=dtype)
  fast, plain = conv.Conv(impl="onednn", **kw), conv.Conv(impl="lax", **kw)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, 3)), jnp.float32)
  v = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  lowered = jax.jit(fast.apply).lower(v, x).as_text()
  assert ("jaxft_onednn_conv_fwd" in lowered) == (dtype == jnp.float32)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(fast.apply(v, x), np.float32),
                             np.asarray(plain.apply(v, x), np.float32), rtol=tol, atol=tol)


def test_supported_rejects_what_onednn_cannot_compute():
  ok = dict(x_shape=(2, 8, 8, 4), kernel_shape=(3, 3, 4, 6), dtype=jnp.float32, strides=(1, 1),
            padding=((1, 1), (1, 1)))
  assert onednn.supported(**ok) == (onednn.available() and jax.local_device_count() == 1)
  assert not onednn.supported(**{**ok, "dtype": jnp.bfloat16})
  assert not onednn.supported(**ok, groups=2)
  assert not onednn.supported(**{**ok, "padding": ((-1, 1), (1, 1))})
  assert not onednn.supported(**{**ok, "kernel_shape": (3, 3, 5, 6)})


@pytest.fixture
def no_onednn(monkeypatch):
  """oneDNN as if building it had failed."""
  monkeypatch.setattr(onednn, "_state", {"error": "RuntimeError: no compiler (test)"})


def test_without_onednn_auto_falls_back_and_explicit_choice_fails_clearly(no_onednn, monkeypatch):
  monkeypatch.delenv("JAXFT_ONEDNN", raising=False)
  assert not onednn.available()
  assert onednn.status() == "unavailable (RuntimeError: no compiler (test))"
  if jax.default_backend() == "cpu":
    assert conv.resolve_impl("auto", 10**6) == "hybrid"
  module = conv.Conv(4, (3, 3), padding=((1, 1), (1, 1)), impl="onednn")
  with pytest.raises(onednn.OneDNNUnavailableError,
                     match=r"conv impl 'onednn' but oneDNN is unavailable \(RuntimeError: no "):
    module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  monkeypatch.setenv("JAXFT_ONEDNN", "1")  # CI: must not silently fall back
  with pytest.raises(onednn.OneDNNUnavailableError, match="JAXFT_ONEDNN=1 but oneDNN"):
    onednn.available()
  monkeypatch.setenv("JAXFT_ONEDNN", "0")
  assert not onednn.available() and onednn.status() == "off (JAXFT_ONEDNN=0)"


def test_build_failure_names_the_fix_and_leaves_no_file(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a compiler that always fails
  with pytest.raises(RuntimeError, match="apt-get install libdnnl-dev"):
    onednn.build()
  assert os.listdir(tmp_path) == []
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="cannot run the C\\+\\+ compiler"):
    onednn.build()
  assert os.listdir(tmp_path) == []


@needs_onednn
def test_build_writes_the_library_into_the_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFT_CACHE_DIR", str(tmp_path))
  path = onednn.build()
  assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith(
      "libjaxft_onednn-")
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
  assert onednn.build() == path  # cached: not rebuilt
