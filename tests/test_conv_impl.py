"""The CPU backend's layers (jaxft.cpu) equal the plain ones (values and gradients) and keep their
parameter trees; the matmul convolutions equal ``lax.conv``."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxft.cpu import conv, flags, impl, norm, onednn, winograd
from jaxft.cpu import layers as cpu
from jaxft.models import create_model, layers
from jaxft.models.model import create
from jaxft.models.network import Network
from jaxft.models.resnet import cifar_resnet_spec


def _lax(x, w, stride, groups):
  p = w.shape[0] // 2
  return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


def _matmul(x, w, stride, groups, lax_forward=False):
  p = w.shape[0] // 2
  return conv.conv_matmul(x, w, (stride, stride), ((p, p), (p, p)), groups, lax_forward=lax_forward)


# (kernel, stride, groups, cin, cout, size): 1×1 / 3×3 / 7×7, strides 1 and 2, odd and even maps,
# a 1×1 map (centre tap only), 2×2 maps (stride 2: four live taps; stride 1: the dense-matrix
# formulation, also for 5×5), depthwise, and a grouped conv that falls back to lax.conv.
CASES = [
    (1, 1, 1, 4, 6, 5), (1, 2, 1, 4, 6, 5), (3, 1, 1, 4, 6, 5), (3, 2, 1, 4, 6, 6),
    (3, 2, 1, 3, 5, 2), (3, 1, 1, 3, 5, 1), (3, 1, 1, 3, 5, 2), (5, 1, 1, 2, 3, 2),
    (7, 2, 1, 3, 8, 9), (3, 1, 4, 4, 4, 5), (5, 2, 6, 6, 6, 7), (3, 2, 4, 4, 4, 6),
    (3, 2, 2, 4, 6, 5),
    # 1×1 with more than 64 input channels: the hybrid kernel gradient takes the transposed-copy GEMM.
    (1, 1, 1, 96, 8, 5), (1, 2, 1, 96, 8, 6),
]


@pytest.mark.parametrize("lax_forward", [False, True], ids=["matmul", "hybrid"])
@pytest.mark.parametrize("k,stride,groups,cin,cout,size", CASES)
def test_matmul_conv_matches_lax_forward_and_gradients(k, stride, groups, cin, cout, size,
                                                       lax_forward):
  r = np.random.default_rng(k * 100 + stride * 10 + groups)
  x = jnp.asarray(r.normal(size=(2, size, size, cin)), jnp.float32)
  w = jnp.asarray(r.normal(size=(k, k, cin // groups, cout)), jnp.float32)
  ct = jnp.asarray(r.normal(size=_lax(x, w, stride, groups).shape), jnp.float32)

  def vjp(f):
    y, pull = jax.vjp(lambda x, w: f(x, w, stride, groups), x, w)
    return (y, *pull(ct))

  fast = lambda x, w, s, g: _matmul(x, w, s, g, lax_forward)
  for got, want in zip(jax.jit(lambda: vjp(fast))(), jax.jit(lambda: vjp(_lax))()):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [12, 13, 32, 33])
def test_hybrid_winograd_maps_match_lax_forward_and_gradients(size):
  # 12…32: forward and input gradient by Winograd F(2×2, 3×3) (odd maps padded to whole tiles);
  # 33: outside the window, XLA's convolution.
  r = np.random.default_rng(size)
  x = jnp.asarray(r.normal(size=(2, size, size, 6)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 3, 6, 5)), jnp.float32)
  ct = jnp.asarray(r.normal(size=(2, size, size, 5)), jnp.float32)
  assert winograd.use_winograd(x, w.shape, (1, 1), ((1, 1), (1, 1))) == (size <= 32)
  got = jax.vjp(lambda x, w: _matmul(x, w, 1, 1, lax_forward=True), x, w)
  want = jax.vjp(lambda x, w: _lax(x, w, 1, 1), x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
  for g, e in zip(got[1](ct), want[1](ct)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_winograd_is_only_for_float32_3x3_stride1_same():
  x = jnp.zeros((1, 16, 16, 4), jnp.float32)
  same = ((1, 1), (1, 1))
  assert winograd.use_winograd(x, (3, 3, 4, 4), (1, 1), same)
  assert not winograd.use_winograd(x, (3, 3, 4, 4), (2, 2), same)
  assert not winograd.use_winograd(x, (1, 1, 4, 4), (1, 1), ((0, 0), (0, 0)))
  assert not winograd.use_winograd(x, (3, 3, 4, 4), (1, 1), ((0, 0), (0, 0)))
  assert not winograd.use_winograd(x.astype(jnp.bfloat16), (3, 3, 4, 4), (1, 1), same)
  assert not winograd.use_winograd(jnp.zeros((1, 8, 8, 4)), (3, 3, 4, 4), (1, 1), same)


def test_dense_formulation_on_a_map_taller_than_the_kernel():
  # 3×3 stride 1 on a 4×2 map: 9 live taps > 8 pixels, so the dense matrix is used, and the column
  # windows of the top and bottom output rows reach past the kernel (zero-padded blocks).
  r = np.random.default_rng(7)
  x = jnp.asarray(r.normal(size=(2, 4, 2, 3)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 3, 3, 5)), jnp.float32)
  assert conv._dense_out_hw(x.shape, w.shape, (1, 1), ((1, 1), (1, 1))) == (4, 2)
  ct = jnp.asarray(r.normal(size=(2, 4, 2, 5)), jnp.float32)
  got = jax.vjp(lambda x, w: _matmul(x, w, 1, 1), x, w)
  want = jax.vjp(lambda x, w: _lax(x, w, 1, 1), x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
  for g, e in zip(got[1](ct), want[1](ct)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_dead_taps_and_dense_formulation_are_chosen_where_cheaper():
  assert conv._live_taps(1, 3, 1, (1, 1)) == (1, 2)  # 1×1 map: the centre tap only
  assert conv._live_taps(2, 3, 2, (1, 1)) == (1, 3)  # 2×2, stride 2: taps 1 and 2
  assert conv._live_taps(8, 3, 1, (1, 1)) == (0, 3)
  assert conv._dense_out_hw((2, 2, 2, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1))) == (2, 2)
  assert conv._dense_out_hw((2, 4, 4, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1))) is None
  assert conv._dense_out_hw((2, 2, 2, 4), (3, 3, 4, 4), (2, 2), ((1, 1), (1, 1))) is None  # 4 = 4 taps


def test_conv_module_keeps_nn_conv_params_and_values():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  plain = layers.conv(8, 3, 2, use_bias=True)
  fast = cpu.cpu_layers("matmul").conv(8, 3, 2, use_bias=True)
  assert type(plain) is nn.Conv and isinstance(fast, cpu.Conv)
  v_plain = plain.init(jax.random.key(0), x)
  v_fast = fast.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v_fast) == {"params": {"kernel": (3, 3, 3, 8), "bias": (8,)}}
  jax.tree.map(np.testing.assert_array_equal, v_fast, v_plain)
  v = {"params": {"kernel": v_plain["params"]["kernel"], "bias": jnp.arange(8.0)}}
  np.testing.assert_allclose(fast.apply(v, x), plain.apply(v, x), rtol=1e-5, atol=1e-5)


def test_network_same_logits_and_grads_with_plain_and_cpu_layers():
  spec = cifar_resnet_spec(8, 3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = create(spec, jax.random.key(0), input_size=8).variables
  if jax.default_backend() == "cpu":
    onednn.load()  # so that auto takes oneDNN where it builds (JAXFT_ONEDNN=1: must)
  nets = {"plain": Network(spec), "cpu": Network(spec, layers=cpu.cpu_layers("auto"))}
  # Same parameter tree (and values) from either layer set.
  trees = {k: jax.eval_shape(lambda n=n: n.init(jax.random.key(0), x)) for k, n in nets.items()}
  assert trees["cpu"] == trees["plain"]

  out = {}
  # auto on CPU: oneDNN (where loaded, else hybrid) on the 8×8 and 4×4 maps, matmul on the 2×2 ones.
  for name, net in nets.items():
    def loss(params, net=net):
      logits, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
      return jnp.sum(logits ** 2), logits

    lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(variables["params"])
    # Code quality is irrelevant for a one-off check; skipping LLVM optimisation saves most of the time.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    out[name] = compiled(variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4),
               out["cpu"], out["plain"])


def test_auto_resolution_and_errors(monkeypatch):
  assert impl.resolve_impl("lax", 4) == "lax"
  assert impl.resolve_impl("matmul", 10**6) == "matmul"
  if jax.default_backend() == "cpu":
    if onednn.load():
      assert impl.resolve_impl("auto", impl.ONEDNN_MIN_PIXELS) == "onednn"
      assert impl.resolve_impl("auto", 10**6) == "onednn"
      assert impl.resolve_impl("auto", 10**6, depthwise=True) == "onednn"
    assert impl.resolve_impl("auto", impl.ONEDNN_MIN_PIXELS - 1) == "matmul"
    assert impl.resolve_impl("auto", impl.ONEDNN_MIN_PIXELS - 1, depthwise=True) == "matmul"
    monkeypatch.setenv("JAXFT_ONEDNN", "0")  # without oneDNN: XLA's convolutions
    assert impl.resolve_impl("auto", impl.SMALL_MAP_PIXELS) == "matmul"
    assert impl.resolve_impl("auto", impl.SMALL_MAP_PIXELS + 1) == "hybrid"
    assert impl.resolve_impl("auto", impl.SMALL_MAP_PIXELS + 1, depthwise=True) == "matmul"
  assert impl.resolve_impl("hybrid", 4, depthwise=True) == "matmul"
  if jax.default_backend() == "cpu":
    assert impl.resolve_impl("onednn", 10**6, depthwise=True) == "onednn"
  with impl.impl_scope("matmul"):
    assert impl.resolve_impl("auto", 10**6) == "matmul"
    assert impl.resolve_impl("lax", 1) == "lax"  # an explicit choice beats the scope
  with pytest.raises(ValueError, match="unknown conv impl 'fft'; valid: auto, lax, matmul, hybrid, onednn"):
    impl.resolve_impl("fft")
  with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
    cpu.cpu_layers("fft")


def test_configure_cpu_is_a_no_op_once_the_backend_runs(monkeypatch):
  jnp.zeros(1).block_until_ready()  # the backend is up
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  assert flags.backend_initialised()
  assert not flags.configure_cpu()
  assert os.environ["XLA_FLAGS"] == "--xla_foo=1"


def _bn_plain(x, scale, bias, eps=1e-5):
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("gemv", [True, False])
def test_batch_norm_train_matches_autodiff_of_the_plain_formula(gemv):
  r = np.random.default_rng(3)
  x = jnp.asarray(r.normal(2.0, 3.0, size=(4, 3, 3, 5)), jnp.float32)
  scale, bias = (jnp.asarray(r.normal(size=5), jnp.float32) for _ in range(2))
  cts = tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in (x.shape, (5,), (5,)))
  fast = lambda x, s, b: norm.batch_norm_train(x, s, b, 1e-5, gemv)
  got_y, got_pull = jax.vjp(fast, x, scale, bias)
  want_y, want_pull = jax.vjp(_bn_plain, x, scale, bias)
  for got, want in zip((*got_y, *got_pull(cts)), (*want_y, *want_pull(cts))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_channel_affine_gradients():
  r = np.random.default_rng(4)
  x, ct = (jnp.asarray(r.normal(size=(3, 2, 2, 4)), jnp.float32) for _ in range(2))
  mul, shift = (jnp.asarray(r.normal(size=4), jnp.float32) for _ in range(2))
  _, got = jax.vjp(lambda *a: norm.channel_affine(*a, True), x, mul, shift)
  _, want = jax.vjp(lambda x, m, s: x * m + s, x, mul, shift)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got(ct), want(ct))


def test_batchnorm_module_same_outputs_stats_and_grads_plain_and_cpu():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3, 3, 6)), jnp.float32)
  out = {}
  for name, bn in (("plain", layers.BatchNorm()), ("lax", cpu.BatchNorm(impl="lax")),
                   ("matmul", cpu.BatchNorm(impl="matmul"))):
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    grads = jax.grad(lambda v, x, ra: jnp.sum(jnp.sin(bn.apply(v, x, use_running_average=ra,
                                                               mutable=["batch_stats"])[0])),
                     (0, 1))
    out[name] = (y, upd, bn.apply({**v, **upd}, x, use_running_average=True),
                 grads(v, x, False), grads(v, x, True))
  for name in ("lax", "matmul"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 out[name], out["plain"])


def test_batchnorm_running_variance_is_unbiased_as_torch():
  x = jnp.asarray([[[[1.0]]], [[[3.0]]]])  # batch 2 on a 1×1 map: biased var 1, unbiased 2
  for bn in (layers.BatchNorm(momentum=0.0), cpu.BatchNorm(momentum=0.0, impl="matmul")):
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    _, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(upd["batch_stats"]["var"], [2.0])
    np.testing.assert_allclose(upd["batch_stats"]["mean"], [2.0])


def test_max_pool_matches_reduce_window_values_and_gradients_with_ties():
  r = np.random.default_rng(6)
  # post-ReLU-like input: many exact ties (zeros), which must send the gradient to the first maximum
  x = jnp.asarray(np.maximum(r.normal(size=(2, 7, 6, 3)), 0.0).round(1), jnp.float32)
  ct = jnp.asarray(r.normal(size=(2, 4, 3, 3)), jnp.float32)
  got_y, got_pull = jax.vjp(lambda x: cpu.max_pool(x, impl="matmul"), x)
  want_y, want_pull = jax.vjp(layers.max_pool_3x3_s2, x)
  np.testing.assert_array_equal(got_y, want_y)
  np.testing.assert_allclose(got_pull(ct)[0], want_pull(ct)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w", [1.0, -2.0, 0.0, float("nan"), float("inf")])
def test_fusion_barrier_returns_its_input_and_stays_a_conditional(w):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
  witness = jnp.full((3, 3, 4, 5), w, jnp.float32)
  f = jax.jit(conv._fusion_barrier)
  np.testing.assert_array_equal(f(x, witness), x)
  # The point of it: XLA keeps the conditional (a fusion boundary) instead of folding it away.
  assert "conditional(" in f.lower(x, witness).compile().as_text()


# --- Moved from tests/test_optim.py: the frozen part's gradients are skipped on every CPU path -------


def _frozen_grad_fn(spec, frozen_prefixes, layers_):
  """Gradient of a train-mode loss with respect to the params outside ``frozen_prefixes`` (the
  others held constant, their BatchNorms frozen), as jaxft.optim's split/merge arranges it."""
  net = Network(spec, frozen_bn=frozen_prefixes, layers=layers_)

  def loss(trainable, frozen, batch_stats, x, y):
    variables = {"params": {**frozen, **trainable}, "batch_stats": batch_stats}
    logits, new = net.apply(variables, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

  return jax.grad(loss, has_aux=True)


def test_frozen_part_gets_no_gradient_computation_on_cpu_paths():
  model = create_model("cifar_resnet20", jax.random.PRNGKey(0), num_classes=10)
  x, y = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3)), jnp.array([3, 7])
  flops, oned = {}, {}
  with_onednn = jax.default_backend() == "cpu" and jax.device_count() == 1 and onednn.load()
  for name, frozen_names in (("all", ()), ("frozen", ("stem", "layer1"))):
    tr = {k: v for k, v in model.params.items() if k not in frozen_names}
    fr = {k: v for k, v in model.params.items() if k in frozen_names}
    args = (tr, fr, model.batch_stats, x, y)
    # The GEMM-formulated convolutions skip the frozen part's work (custom calls, as in the oneDNN
    # path, have no cost model, hence hybrid here).
    g = _frozen_grad_fn(model.spec, frozen_names, cpu.cpu_layers("hybrid"))
    flops[name] = jax.jit(g).lower(*args).cost_analysis()["flops"]
    if with_onednn:  # and so do oneDNN's: XLA drops the unused custom calls
      g = _frozen_grad_fn(model.spec, frozen_names, cpu.cpu_layers("onednn"))
      hlo = jax.jit(g).lower(*args).compile().as_text()
      oned[name] = (hlo.count("custom_call_target=\"jaxft_onednn_conv_bwd_weights\""),
                    hlo.count("custom_call_target=\"jaxft_onednn_conv_bwd_data\""))
  assert flops["frozen"] < 0.8 * flops["all"]
  # ResNet-20: 19 convs, 19 kernel gradients and 18 input gradients when all train; stem and layer1
  # (7 convs) frozen: 12 kernel gradients, 11 input gradients (none into layer1's output).
  if oned:
    assert oned == {"all": (19, 18), "frozen": (12, 11)}
