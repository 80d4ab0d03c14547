"""bfloat16 on CPU through oneDNN (jaxft.cpu.onednn): convolutions (forward, input and kernel
gradients, a float32 master kernel whose gradient stays float32), training-mode BatchNorm (+ ReLU),
the bfloat16 max-pool gradient, routing (used only where the CPU has bfloat16 instructions) and a
20-step training loss curve against float32.

Tolerances: bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%), so one rounded
output is within ~0.4% of the float32 result on the same bfloat16-rounded inputs; the tests allow
1% of the largest magnitude for a convolution's outputs and gradients (each has one bfloat16
rounding of a float32 accumulation). Over 20 training steps rounding differences compound: on the
curve below XLA's own bfloat16 layers stray up to 8% from float32 and oneDNN's up to 12% (measured),
so the curve test allows 15% per step — a wrong gradient (sign, scale, a dropped term) moves it far
more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxft import models, optim, train
from jaxft.cpu import norm, onednn, pool
from jaxft.cpu.layers import BatchNorm, cpu_layers, max_pool


@pytest.fixture
def needs_bf16():
  if jax.default_backend() != "cpu":
    pytest.skip("oneDNN is for the CPU backend")
  if not onednn.load():
    pytest.skip(f"oneDNN {onednn.status()}")
  if not onednn.bf16_supported():
    pytest.skip("this CPU has no bfloat16 instructions (AMX-BF16 / AVX512-BF16)")


def _rel(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _bf16_rounded(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.usefixtures("needs_bf16")
@pytest.mark.parametrize("shape,khw,strides,padding,groups", [
    ((2, 9, 9, 16), (3, 3), (1, 1), ((1, 1), (1, 1)), 1),
    ((2, 8, 8, 20), (1, 1), (2, 2), ((0, 0), (0, 0)), 1),
    ((2, 11, 9, 3), (7, 7), (2, 2), ((3, 3), (3, 3)), 1),
    ((2, 9, 9, 16), (3, 3), (2, 2), ((1, 1), (1, 1)), 16),  # depthwise
])
def test_bf16_conv_matches_float32_on_the_rounded_inputs(shape, khw, strides, padding, groups):
  r = np.random.default_rng(0)
  cin, cout = shape[-1], 24 if groups == 1 else shape[-1]
  x = jnp.asarray(r.normal(size=shape), jnp.float32)
  k = jnp.asarray(r.normal(size=(*khw, cin // groups, cout)) * 0.2, jnp.float32)
  ct = jnp.asarray(r.normal(size=onednn._out_shape(shape, k.shape, strides, padding)), jnp.float32)

  def fast(x, k):  # bfloat16 activations, float32 master kernel
    return onednn.conv(x.astype(jnp.bfloat16), k, strides, padding, groups)

  def ref(x, k):  # float32 arithmetic on the same bfloat16-rounded values
    return lax.conv_general_dilated(_bf16_rounded(x), _bf16_rounded(k), strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)

  y = jax.jit(fast)(x, k)
  assert y.dtype == jnp.bfloat16
  assert _rel(y, ref(x, k)) < 1e-2
  g = jax.jit(jax.grad(lambda x, k: jnp.sum(fast(x, k).astype(jnp.float32) * ct), (0, 1)))(x, k)
  # ct is rounded to bfloat16 on its way into oneDNN: the reference gets the same.
  want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * _bf16_rounded(ct)), (0, 1))(x, k)
  assert g[1].dtype == jnp.float32  # the master kernel's gradient, accumulated in float32
  assert _rel(g[0], want[0]) < 1e-2
  assert _rel(g[1], want[1]) < 1e-2
  # A bfloat16 kernel gets a bfloat16 gradient.
  gk = jax.grad(lambda k: jnp.sum(fast(x, k).astype(jnp.float32)))(k.astype(jnp.bfloat16))
  assert gk.dtype == jnp.bfloat16


@pytest.mark.usefixtures("needs_bf16")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_onednn_batch_norm_matches_the_closed_form(dtype, relu):
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(3, 5, 6, 20)) * 2 + 1, dtype)
  scale = jnp.asarray(r.normal(size=20), jnp.float32)
  shift = jnp.asarray(r.normal(size=20), jnp.float32)
  ct = jnp.asarray(r.normal(size=x.shape), jnp.float32)

  def ref(x, scale, shift):
    y, mean, var = norm.batch_norm_train(x, scale, shift, 1e-5, False)
    return (jnp.maximum(y, 0) if relu else y).astype(dtype), mean, var

  def fast(x, scale, shift):
    return onednn.batch_norm_train(x, scale, shift, 1e-5, relu)

  got, want = jax.jit(fast)(x, scale, shift), ref(x, scale, shift)
  assert got[0].dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, b in zip(got, want):
    assert _rel(a, b) < tol
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0].astype(jnp.float32) * ct)
  ga = jax.jit(jax.grad(loss(fast), (0, 1, 2)))(x, scale, shift)
  gb = jax.grad(loss(ref), (0, 1, 2))(x, scale, shift)
  for a, b in zip(ga, gb):
    assert _rel(a, b) < tol


def _bn_float64(x, scale, shift, ct, relu, eps=1e-5):
  """BatchNorm (+ ReLU) and its VJP in float64 numpy: the reference for the compiled loops."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  ct = np.asarray(ct, np.float64).reshape(x.shape)
  mean, var = x.mean(0), x.var(0)
  rstd = 1 / np.sqrt(var + eps)
  xhat = (x - mean) * rstd
  pre = xhat * scale + shift
  y = np.maximum(pre, 0) if relu else pre
  g = ct * (pre > 0) if relu else ct
  dshift, dscale = g.sum(0), (g * xhat).sum(0)
  dx = scale * rstd * (g - dshift / len(x) - xhat * dscale / len(x))
  return y, mean, var, dx, dscale, dshift


@pytest.mark.usefixtures("needs_bf16")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_over_many_chunks_matches_float64(dtype, relu):
  # 2·41·37 = 3034 rows of 64 channels: two full chunks of 1024 rows and one of 986, each merged
  # into the statistics and the gradient sums; a mean of 50 against a spread of 2 would show a
  # variance computed as E[x²] - E[x]² (float32 cancellation: ~1e-3 relative here).
  r = np.random.default_rng(7)
  x = jnp.asarray(r.normal(50.0, 2.0, size=(2, 41, 37, 64)), dtype)
  scale, shift = (jnp.asarray(r.normal(size=64), jnp.float32) for _ in range(2))
  ct = jnp.asarray(r.normal(size=x.shape), dtype)
  f = lambda x, s, b: onednn.batch_norm_train(x, s, b, 1e-5, relu)
  (y, mean, var), pull = jax.vjp(jax.jit(f), x, scale, shift)
  dx, dscale, dshift = pull((ct, jnp.zeros(64), jnp.zeros(64)))
  want = _bn_float64(x, np.asarray(scale, np.float64), np.asarray(shift, np.float64), ct, relu)
  np.testing.assert_allclose(mean, want[1], rtol=1e-6)
  np.testing.assert_allclose(var, want[2], rtol=1e-4)
  tol = 1e-4 if dtype == jnp.float32 else 1e-2  # bfloat16: one rounding of each output
  assert _rel(y.reshape(-1, 64), want[0]) < tol
  assert _rel(dx.reshape(-1, 64), want[3]) < tol
  # The parameter gradients are float32 sums over the (exact) bfloat16 inputs either way.
  assert _rel(dscale, want[4]) < 1e-4 and _rel(dshift, want[5]) < 1e-4
  # Fixed chunks merged in order: the same bits every call, whatever the threads' timing.
  again = jax.jit(f)(x, scale, shift)
  for a, b in zip(again, (y, mean, var)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.usefixtures("needs_bf16")
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_keeps_a_nan_visible(relu):
  # A diverged activation must not come out as a finite number (the ReLU must not turn NaN into 0),
  # or the training loop's NaN stop would not see it.
  x = np.random.default_rng(9).normal(size=(2, 4, 4, 3))
  x[1, 2, 3, 1] = np.nan
  y, mean, var = onednn.batch_norm_train(jnp.asarray(x, jnp.bfloat16), jnp.ones(3), jnp.zeros(3), 1e-5,
                                         relu)
  y = np.asarray(y, np.float32)
  assert np.isnan(y[..., 1]).all() and np.isnan(mean[1]) and np.isnan(var[1])
  assert np.isfinite(y[..., [0, 2]]).all()


@pytest.mark.usefixtures("needs_bf16")
@pytest.mark.parametrize("impl", ["onednn", "lax"])
def test_batch_norm_relu_flag_matches_relu_after_the_layer(impl):
  # BatchNorm(..., relu=True) is relu(BatchNorm(...)): values and gradients (the compiled loops
  # apply the ReLU inside their pass and recompute its mask in the backward one).
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(4, 6, 6, 8)) * 3 + 1, jnp.bfloat16)
  ct = jnp.asarray(r.normal(size=x.shape), jnp.float32)
  bn = BatchNorm(dtype=jnp.bfloat16, impl=impl)
  v = bn.init(jax.random.key(0), x, use_running_average=False)

  def loss(fused):
    def f(params, x):
      y = bn.apply({**v, "params": params}, x, False, fused, mutable=["batch_stats"])[0]
      y = y if fused else jnp.maximum(y, 0)
      return jnp.sum(y.astype(jnp.float32) * ct), y
    return f

  if impl == "onednn":
    text = jax.jit(loss(True)).lower(v["params"], x).as_text()
    assert "jaxft_bn_fwd" in text and "relu = 1" in text
  (_, y1), g1 = jax.value_and_grad(loss(True), (0, 1), has_aux=True)(v["params"], x)
  (_, y2), g2 = jax.value_and_grad(loss(False), (0, 1), has_aux=True)(v["params"], x)
  assert np.asarray(y1, np.float32).min() == 0.0 and _rel(y1, y2) < 1e-2
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert _rel(a, b) < 2e-2


@pytest.mark.usefixtures("needs_bf16")
def test_bf16_batch_norm_layer_uses_onednn_and_updates_running_statistics():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6, 6, 8)) * 3 + 2, jnp.bfloat16)
  fast, plain = BatchNorm(dtype=jnp.bfloat16, impl="onednn"), BatchNorm(dtype=jnp.bfloat16, impl="lax")
  v = plain.init(jax.random.key(0), x, use_running_average=False)
  text = jax.jit(lambda v, x: fast.apply(v, x, False, mutable=["batch_stats"])).lower(v, x).as_text()
  assert "jaxft_bn_fwd" in text
  (ya, sa), (yb, sb) = (m.apply(v, x, False, mutable=["batch_stats"]) for m in (fast, plain))
  assert _rel(ya, yb) < 1e-2
  for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_max_pool_gradient_equals_the_float32_one():
  # The bfloat16 VJP runs in float32 (XLA:CPU is slow on bfloat16 taps); the maximum is exact, so
  # the routed gradient is the float32 one rounded once.
  r = np.random.default_rng(3)
  x = jnp.asarray(np.maximum(r.normal(size=(2, 9, 9, 4)), 0), jnp.bfloat16)
  ct = jnp.asarray(r.normal(size=(2, 5, 5, 4)), jnp.bfloat16)
  g16 = jax.vjp(lambda x: pool.max_pool(x, 3, 2, 1), x)[1](ct)[0]
  g32 = jax.vjp(lambda x: pool.max_pool(x, 3, 2, 1), x.astype(jnp.float32))[1](
      ct.astype(jnp.float32))[0]
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(g16, np.float32),
                                np.asarray(g32.astype(jnp.bfloat16), np.float32))


@pytest.mark.usefixtures("needs_bf16")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 9, 4), (2, 8, 8, 16), (1, 7, 10, 3)])
def test_onednn_max_pool_matches_jaxfts_and_routes_ties_to_the_first_tap(dtype, shape):
  r = np.random.default_rng(8)
  # After a ReLU about half the inputs are 0, so many windows tie; the last input ties everywhere.
  xs = [np.maximum(r.normal(size=shape), 0), np.zeros(shape)]
  for x in xs:
    x = jnp.asarray(x, dtype)
    y_ref, pull_ref = jax.vjp(lambda x: pool.max_pool(x, 3, 2, 1), x)
    y, pull = jax.vjp(jax.jit(lambda x: onednn.max_pool(x, 3, 2, 1)), x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    ct = jnp.asarray(r.uniform(1, 2, size=y.shape), dtype)  # no zeros: every routed tap shows
    g, g_ref = (np.asarray(p(ct)[0], np.float32) for p in (pull, pull_ref))
    np.testing.assert_array_equal(g != 0, g_ref != 0)  # the same tap of every window
    # Where windows overlap, an input's gradients are summed in another order.
    np.testing.assert_allclose(g, g_ref, rtol=1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.usefixtures("needs_bf16")
def test_the_stem_max_pool_uses_onednn_in_bfloat16_only():
  x = jnp.ones((2, 8, 8, 4))
  pool_of = lambda dtype: jax.jit(jax.grad(
      lambda x: jnp.sum(max_pool(x, "auto").astype(jnp.float32)))).lower(x.astype(dtype)).as_text()
  assert "jaxft_onednn_pool_fwd" in pool_of(jnp.bfloat16)
  assert "jaxft_onednn_pool_bwd" in pool_of(jnp.bfloat16)
  assert "jaxft_onednn_pool" not in pool_of(jnp.float32)


def test_without_bf16_instructions_bfloat16_stays_in_xla(monkeypatch):
  monkeypatch.setattr(onednn, "bf16_supported", lambda: False)
  assert not onednn.supported((2, 8, 8, 4), (3, 3, 4, 6), jnp.bfloat16, (1, 1), ((1, 1), (1, 1)))
  assert not onednn.norm_supported((2, 8, 8, 4), jnp.bfloat16)


def test_bf16_instructions_override(monkeypatch):
  monkeypatch.setenv("JAXFT_ONEDNN_BF16", "0")
  assert not onednn.bf16_supported()
  monkeypatch.setenv("JAXFT_ONEDNN_BF16", "1")
  assert onednn.bf16_supported()
  monkeypatch.delenv("JAXFT_ONEDNN_BF16")
  assert onednn.bf16_supported() == bool(onednn.cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _loss_curve(dtype, steps=20):
  model = models.create_model("cifar_resnet20", jax.random.key(0), num_classes=4)
  cfg = optim.default_config()
  cfg.update(name="sgd", lr=0.005, momentum=0.9, weight_decay=5e-4)
  opt = optim.build_optimizer(cfg, model.params, spec=model.spec, total_steps=steps)
  trainable, frozen = opt.split(model.params)
  net = models.Network(model.spec, dtype=dtype, frozen_bn=tuple(opt.frozen_bn),
                       layers=cpu_layers("auto"))
  sc = train.StepConfig(crop_padding=0, flip=False, out_size=None, mean=(0.5,) * 3, std=(0.25,) * 3,
                        label_smoothing=0.0)
  state = train.TrainState.create(trainable, frozen, model.batch_stats, opt.tx.init(trainable))
  step = jax.jit(train.make_train_step(net, opt.tx, opt.schedule, sc, seed=0))
  r = np.random.default_rng(0)
  labels = r.integers(0, 4, 16).astype(np.int32)
  # Learnable images: each class a different mean brightness per channel, plus noise.
  images = np.clip(r.normal(size=(16, 12, 12, 3)) * 40 + 60 * labels[:, None, None, None] % 256
                   + 40, 0, 255).astype(np.uint8)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  text = step.lower(state, batch).as_text()
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses), text


@pytest.mark.usefixtures("needs_bf16")
def test_twenty_step_bf16_loss_curve_follows_float32():
  l32, _ = _loss_curve(jnp.float32)
  l16, text = _loss_curve(jnp.bfloat16)
  assert "jaxft_onednn_conv_bwd_weights" in text and "jaxft_bn_bwd" in text
  assert "relu = 1" in text  # the BNs followed by a ReLU apply it in their own pass
  assert l32[-1] < 0.7 * l32[0]  # it learns, so the comparison means something
  np.testing.assert_allclose(l16, l32, rtol=0.15)


@pytest.mark.slow
def test_the_pypi_wheels_build_and_run_where_installed(tmp_path):
  # pip install jaxft[onednn]: compiled against the wheels (as where no system oneDNN exists) and run
  # in a fresh process without LD_LIBRARY_PATH or OCL_ICD_FILENAMES (the library's RPATH and the
  # explicit load step find the wheels' runtime).
  import os
  import subprocess
  import sys
  if onednn.pip_prefix() is None:
    pytest.skip("the onednn / onednn-devel wheels are not installed (pip install jaxft[onednn])")
  code = (
      "import jax.numpy as jnp\n"
      "from jaxft.cpu import onednn\n"
      "onednn._system_has_onednn = lambda: False\n"
      "assert onednn.load(), onednn.status()\n"
      "x = jnp.ones((2, 6, 6, 8), jnp.bfloat16)\n"
      "k = jnp.ones((3, 3, 8, 4), jnp.float32)\n"
      "print(onednn.status(), float(onednn.conv(x, k, (1, 1), ((1, 1), (1, 1)))[0, 2, 2, 0]))\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_LIBRARY_PATH", "OCL_ICD_FILENAMES", "DNNLROOT")}
  env["JAXFT_NATIVE_CACHE_DIR"] = str(tmp_path)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "oneDNN 3." in out.stdout and out.stdout.split()[-1] == "72.0"  # 3·3·8 ones
