"""The inference epilogue (jaxft.cpu.epilogue): a convolution with the BatchNorm (running statistics),
residual add and activation after it computed as one oneDNN call.

The fused op is checked against the unfused reference (``Epilogue.apply`` of ``lax.conv``) for
values and every gradient; a network in inference is checked against the plain layers, and where it
must not fuse (training, LoRA convs) it is checked that it does not. Tolerances: float32 results
differ from the reference only by summation order and the kernel being scaled before the
convolution instead of its output after it (~1e-6 relative); bfloat16 keeps 8 significant bits,
one rounding of a float32 result, so 1% of the largest magnitude.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxft import models, surgery
from jaxft.cpu import epilogue, onednn
from jaxft.cpu.layers import cpu_layers
from jaxft.models.layers import Epilogue, Layers


@pytest.fixture
def needs_onednn():
  if jax.default_backend() != "cpu":
    pytest.skip("oneDNN is for the CPU backend")
  if not onednn.load():
    pytest.skip(f"oneDNN {onednn.status()}")


def _rel(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _case(shape, khw, strides, padding, groups, residual, seed=0):
  r = np.random.default_rng(seed)
  cin = shape[-1]
  cout = cin if groups > 1 else 24
  x = jnp.asarray(r.normal(size=shape), jnp.float32)
  k = jnp.asarray(r.normal(size=(*khw, cin // groups, cout)) * 0.2, jnp.float32)
  out = onednn._out_shape(shape, k.shape, strides, padding)
  mul = jnp.asarray(r.uniform(0.5, 1.5, cout), jnp.float32)
  shift = jnp.asarray(r.normal(size=cout), jnp.float32)
  res = jnp.asarray(r.normal(size=out), jnp.float32) if residual else None
  return x, k, mul, shift, res


def _reference(x, k, mul, shift, res, strides, padding, groups, act):
  y = lax.conv_general_dilated(x, k.astype(x.dtype), strides, padding,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=groups, preferred_element_type=jnp.float32)
  return Epilogue(mul, shift, res, act).apply(y).astype(x.dtype)


CASES = [
    ((2, 9, 9, 16), (3, 3), (1, 1), ((1, 1), (1, 1)), 1, True, "relu"),
    ((2, 8, 8, 20), (1, 1), (2, 2), ((0, 0), (0, 0)), 1, False, "identity"),
    ((2, 8, 8, 20), (1, 1), (1, 1), ((0, 0), (0, 0)), 1, True, "identity"),
    ((2, 11, 9, 3), (7, 7), (2, 2), ((3, 3), (3, 3)), 1, False, "relu"),
    ((2, 9, 9, 16), (3, 3), (2, 2), ((1, 1), (1, 1)), 16, False, "relu6"),  # depthwise
]


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("shape,khw,strides,padding,groups,residual,act", CASES)
def test_fused_values_and_gradients_match_the_unfused_reference(shape, khw, strides, padding,
                                                                 groups, residual, act):
  x, k, mul, shift, res = _case(shape, khw, strides, padding, groups, residual)

  def fused(x, k, mul, shift, res):
    return epilogue.conv_epilogue(x, k, strides, padding, groups, Epilogue(mul, shift, res, act))

  def ref(x, k, mul, shift, res):
    return _reference(x, k, mul, shift, res, strides, padding, groups, act)

  args = (x, k, mul, shift, res)
  hlo = jax.jit(fused).lower(*args).as_text()
  assert "jaxft_onednn_conv_bias" in hlo  # really the fused custom call, not the fallback
  assert _rel(jax.jit(fused)(*args), ref(*args)) < 1e-5
  ct = jnp.asarray(np.random.default_rng(1).normal(size=ref(*args).shape), jnp.float32)
  argnums = (0, 1, 2, 3, 4) if residual else (0, 1, 2, 3)
  got = jax.jit(jax.grad(lambda *a: jnp.sum(fused(*a) * ct), argnums))(*args)
  want = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums)(*args)
  for g, w in zip(got, want):
    assert _rel(g, w) < 1e-5


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("shape,khw,strides,padding,groups,residual,act", CASES[:2])
def test_bf16_fused_is_one_rounding_of_the_float32_result(shape, khw, strides, padding, groups,
                                                          residual, act):
  if not onednn.bf16_supported():
    pytest.skip("this CPU has no bfloat16 instructions (AMX-BF16 / AVX512-BF16)")
  x, k, mul, shift, res = _case(shape, khw, strides, padding, groups, residual)
  xb = x.astype(jnp.bfloat16)
  rb = None if res is None else res.astype(jnp.bfloat16)
  got = epilogue.conv_epilogue(xb, k, strides, padding, groups, Epilogue(mul, shift, rb, act))
  assert got.dtype == jnp.bfloat16
  rounded = lambda a: None if a is None else a.astype(jnp.bfloat16).astype(jnp.float32)
  want = _reference(rounded(x), rounded(k), mul, shift, rounded(res), strides, padding, groups, act)
  assert _rel(got, want) < 1e-2


@pytest.mark.usefixtures("needs_onednn")
def test_conv_bias_is_folded_into_the_epilogue():
  x, k, mul, shift, _ = _case((2, 9, 9, 16), (3, 3), (1, 1), ((1, 1), (1, 1)), 1, False)
  bias = jnp.linspace(-1.0, 1.0, k.shape[-1])
  e = Epilogue(mul, shift, None, "relu").with_bias(bias)
  got = epilogue.conv_epilogue(x, k, (1, 1), ((1, 1), (1, 1)), 1, e)
  y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  assert _rel(got, jax.nn.relu(y * mul + shift)) < 1e-5


def test_an_unknown_epilogue_activation_is_one_clear_error(needs_onednn):
  x, k, _, shift, _ = _case((1, 4, 4, 2), (1, 1), (1, 1), ((0, 0), (0, 0)), 1, False)
  with pytest.raises(ValueError, match="no activation 'gelu'"):
    onednn.forward_epilogue(x, k, shift, None, "gelu", (1, 1), ((0, 0), (0, 0)))
  assert not epilogue.fusable(Epilogue(act="gelu"))


def _perturbed_stats(model):
  key = jax.random.key(1)
  return jax.tree.map(lambda v: v + 0.2 * jax.random.uniform(key, v.shape), model.batch_stats)


def _eval(net, model, stats, x):
  f = jax.jit(lambda x: net.apply({"params": model.params, "batch_stats": stats}, x, train=False))
  return f(x), f.lower(x).as_text()


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("arch,size", [("resnet18", 36), ("cifar_resnet20", 12),
                                       ("efficientnet_lite0", 36)])
def test_network_inference_fuses_every_conv_bn_and_matches_the_plain_layers(arch, size):
  model = models.create_model(arch, jax.random.key(0), num_classes=5)
  stats = _perturbed_stats(model)
  x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
  want, _ = _eval(models.Network(model.spec, layers=Layers()), model, stats, x)
  got, hlo = _eval(models.Network(model.spec, layers=cpu_layers()), model, stats, x)
  assert _rel(got, want) < 1e-4
  assert hlo.count("jaxft_onednn_conv_bias") >= 3


@pytest.mark.usefixtures("needs_onednn")
@pytest.mark.parametrize("fuse", ["0", "1"])
def test_residual_adds_are_fused_only_where_the_cpu_fuses_them(monkeypatch, fuse):
  # AVX2-only CPUs run oneDNN's 1x1 kernels slower with the residual post-op than without
  # (docs/benchmarks.md): there the residual conv runs unfused, the others still fuse.
  monkeypatch.setenv("JAXFT_EPILOGUE_RESIDUAL", fuse)
  model = models.create_model("cifar_resnet20", jax.random.key(0), num_classes=5)
  stats = _perturbed_stats(model)
  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  want, _ = _eval(models.Network(model.spec, layers=Layers()), model, stats, x)
  got, hlo = _eval(models.Network(model.spec, layers=cpu_layers()), model, stats, x)
  assert _rel(got, want) < 1e-4
  assert (hlo.count("jaxft_onednn_conv_bias_add") >= 3) == (fuse == "1")
  assert hlo.count("jaxft_onednn_conv_bias") >= 3


def test_residual_fusion_follows_the_cpu_unless_overridden(monkeypatch):
  monkeypatch.delenv("JAXFT_EPILOGUE_RESIDUAL", raising=False)
  assert epilogue.fuses_residuals() == ("avx512f" in onednn.cpu_flags())
  res = jnp.zeros((1, 2, 2, 3))
  assert epilogue.fusable(Epilogue(act="relu"))
  assert epilogue.fusable(Epilogue(residual=res, act="relu")) == epilogue.fuses_residuals()
  monkeypatch.setenv("JAXFT_EPILOGUE_RESIDUAL", "0")
  assert not epilogue.fusable(Epilogue(residual=res, act="relu"))


@pytest.mark.usefixtures("needs_onednn")
def test_training_steps_and_lora_convs_are_not_fused():
  model = models.create_model("cifar_resnet20", jax.random.key(0), num_classes=5)
  net = models.Network(model.spec, layers=cpu_layers())
  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  train = jax.jit(lambda x: net.apply({"params": model.params, "batch_stats": model.batch_stats}, x,
                                      train=True, mutable=["batch_stats"]))
  assert "jaxft_onednn_conv_bias" not in train.lower(x).as_text()

  lora = surgery.add_lora(model, "stem/conv", rank=2)
  lora_net = models.Network(lora.spec, layers=cpu_layers())
  stats = _perturbed_stats(lora)
  got, hlo = _eval(lora_net, lora, stats, x)
  want, plain_hlo = _eval(models.Network(model.spec, layers=cpu_layers()), model, stats, x)
  # One fused call fewer (the LoRA conv), the same function (LoRA's up kernel starts at zero).
  assert hlo.count("jaxft_onednn_conv_bias") == plain_hlo.count("jaxft_onednn_conv_bias") - 1
  assert _rel(got, want) < 1e-5


@pytest.mark.usefixtures("needs_onednn")
def test_a_folded_model_fuses_its_conv_biases():
  model = models.create_model("cifar_resnet20", jax.random.key(0), num_classes=5)
  stats = _perturbed_stats(model)
  model = dataclasses.replace(model, variables={"params": model.params, "batch_stats": stats})
  folded = surgery.fold_batchnorm(model)
  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  want, _ = _eval(models.Network(model.spec, layers=Layers()), model, stats, x)
  got, hlo = _eval(models.Network(folded.spec, layers=cpu_layers()), folded, folded.batch_stats, x)
  assert "jaxft_onednn_conv_bias" in hlo
  assert _rel(got, want) < 1e-4
