"""The matmul convolutions equal ``lax.conv`` (values and gradients) and keep nn.Conv's parameter tree."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxft.models import conv, layers
from jaxft.models.model import create
from jaxft.models.network import Network
from jaxft.models.resnet import cifar_resnet_spec


def _lax(x, w, stride, groups):
  p = w.shape[0] // 2
  return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


def _matmul(x, w, stride, groups):
  p = w.shape[0] // 2
  return conv.conv_matmul(x, w, (stride, stride), ((p, p), (p, p)), groups)


# (kernel, stride, groups, cin, cout, size): 1×1 / 3×3 / 7×7, strides 1 and 2, odd and even maps,
# a 1×1 map, depthwise, and a grouped conv that falls back to lax.conv.
CASES = [
    (1, 1, 1, 4, 6, 5), (1, 2, 1, 4, 6, 5), (3, 1, 1, 4, 6, 5), (3, 2, 1, 4, 6, 6),
    (3, 2, 1, 3, 5, 2), (3, 1, 1, 3, 5, 1), (7, 2, 1, 3, 8, 9), (3, 1, 4, 4, 4, 5),
    (5, 2, 6, 6, 6, 7), (3, 2, 4, 4, 4, 6), (3, 2, 2, 4, 6, 5),
]


@pytest.mark.parametrize("k,stride,groups,cin,cout,size", CASES)
def test_matmul_conv_matches_lax_forward_and_gradients(k, stride, groups, cin, cout, size):
  r = np.random.default_rng(k * 100 + stride * 10 + groups)
  x = jnp.asarray(r.normal(size=(2, size, size, cin)), jnp.float32)
  w = jnp.asarray(r.normal(size=(k, k, cin // groups, cout)), jnp.float32)
  ct = jnp.asarray(r.normal(size=_lax(x, w, stride, groups).shape), jnp.float32)

  def vjp(f):
    y, pull = jax.vjp(lambda x, w: f(x, w, stride, groups), x, w)
    return (y, *pull(ct))

  for got, want in zip(jax.jit(lambda: vjp(_matmul))(), jax.jit(lambda: vjp(_lax))()):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_module_keeps_nn_conv_params_and_values():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  plain = layers.conv(8, 3, 2, use_bias=True, impl="lax")
  fast = layers.conv(8, 3, 2, use_bias=True, impl="matmul")
  v_plain = plain.init(jax.random.key(0), x)
  v_fast = fast.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v_fast) == {"params": {"kernel": (3, 3, 3, 8), "bias": (8,)}}
  jax.tree.map(np.testing.assert_array_equal, v_fast, v_plain)
  v = {"params": {"kernel": v_plain["params"]["kernel"], "bias": jnp.arange(8.0)}}
  np.testing.assert_allclose(fast.apply(v, x), plain.apply(v, x), rtol=1e-5, atol=1e-5)


def test_network_same_logits_and_grads_under_every_impl():
  spec = cifar_resnet_spec(8, 3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  net = Network(spec)
  variables = create(spec, jax.random.key(0), input_size=8).variables

  def loss(params):
    logits, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          train=True, mutable=["batch_stats"])
    return jnp.sum(logits ** 2), logits

  out = {}
  for impl in ("lax", "auto"):  # auto on CPU: lax.conv on the 8×8 maps, matmul on the 2×2 ones
    with conv.impl_scope(impl):  # fixed at trace time: a fresh jit per impl
      lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(variables["params"])
    # Code quality is irrelevant for a one-off check; skipping LLVM optimisation saves most of the time.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    out[impl] = compiled(variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4),
               out["auto"], out["lax"])


def test_auto_resolution_and_errors():
  assert conv.resolve_impl("lax", 4) == "lax"
  assert conv.resolve_impl("matmul", 10**6) == "matmul"
  if jax.default_backend() == "cpu":
    assert conv.resolve_impl("auto", conv.SMALL_MAP_PIXELS) == "matmul"
    assert conv.resolve_impl("auto", conv.SMALL_MAP_PIXELS + 1) == "lax"
    assert conv.resolve_impl("auto", conv.SMALL_MAP_PIXELS + 1, depthwise=True) == "matmul"
  with conv.impl_scope("matmul"):
    assert conv.resolve_impl("auto", 10**6) == "matmul"
    assert conv.resolve_impl("lax", 1) == "lax"  # an explicit choice beats the scope
  with pytest.raises(ValueError, match="unknown conv impl 'fft'; valid: auto, lax, matmul"):
    conv.resolve_impl("fft")


def test_configure_cpu_is_a_no_op_once_the_backend_runs(monkeypatch):
  jnp.zeros(1).block_until_ready()  # the backend is up
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  assert not conv.configure_cpu()
  assert os.environ["XLA_FLAGS"] == "--xla_foo=1"
