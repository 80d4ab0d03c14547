"""Tests of Net2WiderNet widening (``surgery.widen``, ``surgery.widen_stage``) and of ``replace_block`` on
option-A ResNets: function preservation in eval and train mode (logits and BN running-statistic
updates), each shown to fail without its preserving step; exact replay; report; bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import paths, surgery
from jaxft.models import get_spec, resnet_spec
from jaxft.surgery import widening
from jaxft.surgery.select import block_index

from test_surgery import X, assert_shared, fingerprint, mbconv_spec, random_model, run, shrink, tiny

TOL = 1e-5  # |Δlogits| relative to max |logits|
# Train mode normalises by batch statistics; at the last stage of a 32-px input they come from a few
# values per channel, and a batch of 2 amplifies float rounding past TOL. 8 images condition them.
XT = jax.random.normal(jax.random.key(7), (8, 32, 32, 3))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


_FNS: dict = {}


def _fn(model, train: bool):
  """One jitted forward per (structure, mode): models of one spec (mutated copies, replays) reuse it."""
  key = (model.spec, train)
  if key not in _FNS:
    net = model.module()
    _FNS[key] = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]) if train
                        else net.apply(v, x))
  return _FNS[key]


def logits(model, x=X) -> np.ndarray:
  """Eval-mode logits."""
  return np.asarray(_fn(model, False)(model.variables, x))


def train_apply(model, x=XT) -> tuple[np.ndarray, dict]:
  """Train-mode logits (batch statistics) and the updated running statistics, flat."""
  out, upd = _fn(model, True)(model.variables, x)
  return np.asarray(out), {k: np.asarray(v) for k, v in paths.flatten(upd["batch_stats"]).items()}


def bn_maps(base, records) -> dict[str, np.ndarray]:
  """Module → source map of every module the widen / widen_stage ``records`` (applied to ``base`` in
  order) replicated, composed over the records; read from the records' ``sources``."""
  spec, out = base.spec, {}
  for record in records:
    src, step = record["args"]["sources"], {}
    if record["op"] == "widen":
      for key, g in src.items():
        block, producer = key.rsplit("/", 1)
        i, j = block_index(spec, block)
        inner = next(x for x in surgery.BLOCK_KINDS[spec.stages[i].blocks[j].kind].inner
                     if x.producer == producer)
        step.update({f"{block}/{m}": np.asarray(g) for m in inner.producers})
    else:
      for s in widening.streams(spec):
        if s.name in src:
          step.update({m: np.asarray(src[s.name]) for m in s.producers})
    out.update({m: out[m][g] if m in out else g for m, g in step.items()})
  return out


def check_preserved(before, after, tol=TOL, x=X, xt=XT) -> None:
  """Eval-mode logits (on ``x``), train-mode logits and every updated running statistic (on ``xt``;
  replicated by the source maps of the records ``after`` added) equal ``before``'s."""
  assert rel_err(logits(after, x), logits(before, x)) <= tol
  ref_out, ref_stats = train_apply(before, xt)
  out, stats = train_apply(after, xt)
  assert rel_err(out, ref_out) <= tol
  maps = bn_maps(before, after.history[len(before.history):])
  widened = 0
  for p, v in stats.items():
    module = p.rsplit("/", 1)[0]
    want = ref_stats[p][maps[module]] if module in maps else ref_stats[p]
    widened += module in maps
    np.testing.assert_allclose(v, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=p)
  assert widened  # some running statistics were widened and checked


def undo_division(model, module: str, g: np.ndarray):
  """``model`` with ``module``'s kernel multiplied back by the copy counts (the division removed)."""
  v = paths.flatten(model.variables)
  counts = np.bincount(g)[g]
  v[f"params/{module}/kernel"] = np.asarray(v[f"params/{module}/kernel"]) * counts[:, None]
  return model.replace(variables=paths.unflatten(v))


def unreplicate_stats(model, bn: str, n: int):
  """``model`` with ``bn``'s running statistics of the new channels (``>= n``) at their init, 0 and 1."""
  v = paths.flatten(model.variables)
  for leaf, fill in (("mean", 0.0), ("var", 1.0)):
    a = np.array(v[f"batch_stats/{bn}/{leaf}"])
    a[n:] = fill
    v[f"batch_stats/{bn}/{leaf}"] = a
  return model.replace(variables=paths.unflatten(v))


# --------------------------------------------------------------------------------------------------
# Tiny networks of every block kind.


@pytest.mark.parametrize("name,block,inner_consumer,inner_bn,stream_bn,stream_consumer", [
    ("basic", "layer2/block0", "conv2", "bn1", "layer3/block0/bn2", "layer4/block0/conv1"),
    ("bottleneck", "layer3/block0", "conv3", "bn2", "layer2/block0/downsample_bn",
     "layer3/block0/downsample_conv"),
    ("cifar", "layer2/block0", "conv2", "bn1", "layer3/block0/bn2", "head"),
    ("mbconv", "stage1/block1", "project_conv", "bn1", "stage2/block0/bn2", "neck_conv"),
])
def test_widen_preserves_function(name, block, inner_consumer, inner_bn, stream_bn, stream_consumer):
  m = tiny(name)
  inner = run(surgery.widen, m, factor=1.5, seed=3)
  assert_shared(m, inner, touched=tuple(surgery.block_names(m.spec)))
  out = run(surgery.widen_stage, inner, ".*", factor=1.5, seed=4)
  i, j = block_index(m.spec, block)
  n = m.spec.stages[i].blocks[j].width
  assert out.spec.stages[i].blocks[j].width == round(1.5 * n)
  assert out.spec.stem.width == round(1.5 * m.spec.stem.width)
  assert [b.out for st in out.spec.stages for b in st.blocks] == [
      round(1.5 * b.out) for st in m.spec.stages for b in st.blocks]
  assert out.params["head"]["bias"] is m.params["head"]["bias"]
  check_preserved(m, out)
  # Each preserving step is needed: without a division, or without replicated statistics, it fails.
  kind = surgery.BLOCK_KINDS[m.spec.stages[i].blocks[j].kind]
  g = np.asarray(out.history[-2]["args"]["sources"][f"{block}/{kind.inner[-1].producer}"])
  assert rel_err(logits(undo_division(out, f"{block}/{inner_consumer}", g)), logits(m)) > 1e-3
  assert rel_err(logits(unreplicate_stats(out, f"{block}/{inner_bn}", n)), logits(m)) > 1e-3
  stream = next(s for s in widening.streams(m.spec) if stream_bn in s.producers)
  g = np.asarray(out.history[-1]["args"]["sources"][stream.name])
  assert rel_err(logits(undo_division(out, stream_consumer, g)), logits(m)) > 1e-3
  assert rel_err(logits(unreplicate_stats(out, stream_bn, stream.width)), logits(m)) > 1e-3


def test_widen_one_stage_and_streams():
  m = tiny("basic")  # ResNet-18-like: layer1 keeps the stem's shape, so they are one stream
  assert [s.name for s in widening.streams(m.spec)] == ["stem+layer1", "layer2", "layer3", "layer4"]
  out = run(surgery.widen_stage, m, "layer3", out=40, seed=1)
  assert [b.out for st in out.spec.stages for b in st.blocks] == [8, 16, 40, 64]
  check_preserved(m, out)
  assert_shared(m, out, touched=("layer3/block0/conv2", "layer3/block0/bn2", "layer3/block0/downsample_conv",
                                 "layer3/block0/downsample_bn", "layer4/block0/conv1",
                                 "layer4/block0/downsample_conv"))
  out1 = run(surgery.widen_stage, m, "layer1", out=12)
  assert out1.spec.stem.width == 12 and list(out1.history[-1]["args"]["sources"]) == ["stem+layer1"]
  assert rel_err(logits(out1), logits(m)) <= TOL


def test_widen_adapters_and_extra_heads():
  m = surgery.add_head(surgery.add_adapters(tiny("cifar"), "layer3/.*", width=4), "aux", 3)
  v = paths.flatten(m.variables)  # non-zero adapter up-projections, so they matter
  v["params/layer3/block0/adapter/up/kernel"] = np.full(v["params/layer3/block0/adapter/up/kernel"].shape,
                                                        0.05, np.float32)
  m = m.replace(variables=paths.unflatten(v))
  out = surgery.widen_stage(m, ".*", factor=2)
  assert out.params["layer3"]["block0"]["adapter"]["down"]["kernel"].shape == (1, 1, 128, 4)
  heads = lambda model: jax.jit(lambda v, x: model.module().apply(v, x, return_all=True)["heads"])(
      model.variables, X)
  before, after = heads(m), heads(out)
  assert sorted(after) == ["aux", "head"]
  for name, ref in before.items():
    assert rel_err(np.asarray(after[name]), np.asarray(ref)) <= TOL, name


def test_noise_breaks_symmetry_and_keeps_function():
  m = tiny("cifar")
  exact = surgery.widen(m, "layer2/.*", factor=2, seed=5)
  noisy = run(surgery.widen, m, "layer2/.*", factor=2, noise=0.5, seed=5)
  assert noisy.history[-1]["args"]["noise"] == 0.5
  assert noisy.history[-1]["args"]["sources"] == exact.history[-1]["args"]["sources"]
  check_preserved(m, noisy)
  g = np.asarray(noisy.history[-1]["args"]["sources"]["layer2/block0/conv1"])
  w_exact = np.asarray(exact.params["layer2"]["block0"]["conv2"]["kernel"])
  w_noisy = np.asarray(noisy.params["layer2"]["block0"]["conv2"]["kernel"])
  copy, orig = 32, g[32]  # a copy and its source: exact copies share their outgoing weights …
  np.testing.assert_array_equal(w_exact[:, :, copy], w_exact[:, :, orig])
  assert np.abs(w_noisy[:, :, copy] - w_noisy[:, :, orig]).max() > 0.1 * np.abs(w_exact).max()
  # … and the noise sums to zero over the copies of each channel.
  np.testing.assert_allclose(w_noisy[:, :, copy] + w_noisy[:, :, orig],
                             w_exact[:, :, copy] + w_exact[:, :, orig], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Replay, report.


def test_replay_is_bit_identical_and_seeded():
  m = tiny("bottleneck")
  out = surgery.apply_ops(m, [
      {"op": "widen", "blocks": "layer[23]/.*", "factor": 1.5, "noise": 0.1, "seed": 7},
      {"op": "widen_stage", "stages": "layer[34]", "factor": 1.25, "noise": 0.1, "seed": 8}])
  again = surgery.replay(m, json.loads(json.dumps(list(out.history))))
  redrawn = surgery.widen_stage(surgery.widen(m, "layer[23]/.*", factor=1.5, noise=0.1, seed=7),
                                "layer[34]", factor=1.25, noise=0.1, seed=8)
  for other in (again, redrawn):
    assert other.spec == out.spec and other.history == out.history
    for p, v in paths.flatten(out.variables).items():
      np.testing.assert_array_equal(paths.get(other.variables, p), v, err_msg=p)
  # The sources record makes replay exact on other weights too; another seed draws other copies.
  other = random_model(m.spec, 9)
  rep = surgery.replay(other, out.history[:1])
  assert rep.history[-1]["args"]["sources"] == out.history[0]["args"]["sources"]
  assert (surgery.widen(m, "layer[23]/.*", factor=1.5, seed=70).history[-1]["args"]["sources"]
          != out.history[0]["args"]["sources"])


def test_report_shows_widened_params_and_flops():
  m = tiny("cifar")
  out = surgery.widen_stage(surgery.widen(m, "layer1/.*", width=24), "layer3", out=80)
  r = surgery.report(m, out, input_size=32)
  # conv1 +3·3·16·8, bn1 +2·8, conv2 +3·3·8·16; layer3 stream: conv2 +3·3·64·16, bn2 +2·16, head +16·5
  assert r.params_after - r.params_before == 1152 + 16 + 1152 + 9216 + 32 + 80
  assert r.params_after == surgery.count_params(random_model(out.spec))
  assert r.flops_after > r.flops_before
  assert "params" in str(r) and "FLOPs@32" in str(r)
  d = surgery.diff(m, out)
  assert [o["op"] for o in d.ops] == ["widen", "widen_stage"]
  assert "params/layer3/block0/conv2/kernel" in {e["path"] for e in d.reshaped}


# --------------------------------------------------------------------------------------------------
# Option-A shortcuts.


def test_option_a_stages_keep_shortcut_positions():
  m = tiny("cifar")
  out = run(surgery.widen_stage, m, "layer3", out=80, seed=2)  # last stage: its padding grows
  check_preserved(m, out)
  g = np.asarray(out.history[-1]["args"]["sources"]["layer3"])
  np.testing.assert_array_equal(g[24:56], np.arange(16, 48))  # the 32 shortcut channels, re-centred
  bad = g.tolist()
  bad[24], bad[25] = bad[25], bad[24]
  with pytest.raises(ValueError, match=r"sources\['layer3'\] breaks the option-A shortcut of layer3/block0: "
                     r"entries 24…55 must copy the shortcut's channels"):
    surgery.widen_stage(m, "layer3", out=80, sources={"layer3": bad})
  with pytest.raises(ValueError, match=r"sources given for streams this call does not widen: \['layer2'\]"):
    surgery.widen_stage(m, "layer3", out=80, sources={"layer3": g.tolist(), "layer2": list(range(32))})
  with pytest.raises(ValueError, match=r"cannot widen layer2 to 32 channels: layer2/block0 has an "
                     r"option-A shortcut .* needs exactly 40 or more channels"):
    surgery.widen_stage(m, "layer1", out=24)
  with pytest.raises(ValueError, match=r"cannot widen layer3 to 64 channels: layer3/block0 has an option-A"):
    surgery.widen_stage(m, "layer[12]", factor=1.5)
  with pytest.raises(ValueError, match=r"cannot widen layer3 to 64 channels: .* needs exactly 80 or more"):
    surgery.widen_stage(m, "layer2", out=48)


def test_replace_block_on_option_a_resnets():
  m = random_model(get_spec("cifar_resnet20", 5))
  with pytest.raises(ValueError, match=r"replace_block\('layer1/block0', out=128\) gives layer1/block1 128 "
                     r"input channels but it outputs 16: its option-A shortcut \(zero padding\) cannot "
                     r"drop channels; give layer1/block1 out >= 128"):
    surgery.replace_block(m, "layer1/block0", {"out": 128})
  out = run(surgery.replace_block, m, "layer1/block2", {"out": 24})  # layer2/block0 pads 24 → 32
  assert out.history[-1]["reinitialised"] == ["layer2/block0/conv1"]
  out = run(surgery.replace_block, m, "layer3/block2", {"out": 128})
  assert out.history[-1]["reinitialised"] == ["head"] and logits(out).shape == (2, 5)


# --------------------------------------------------------------------------------------------------
# Bad input.


def test_widen_errors():
  m = tiny("basic")
  with pytest.raises(ValueError, match="give exactly one of width="):
    surgery.widen(m, width=32, factor=2)
  with pytest.raises(ValueError, match="factor must be >= 1"):
    surgery.widen(m, factor=0.5)
  with pytest.raises(ValueError, match="cannot widen layer2/block0 to 8 channels: it has 16"):
    surgery.widen(m, "layer2/.*", width=8)
  with pytest.raises(ValueError, match="noise must be >= 0"):
    surgery.widen(m, factor=2, noise=-1.0)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    surgery.widen(m, factor=2, seed=-1)
  with pytest.raises(ValueError, match=r"sources must have exactly the keys \['layer2/block0/conv1'\]"):
    surgery.widen(m, "layer2/.*", width=20, sources={"x": [0]})
  with pytest.raises(ValueError, match=r"sources\['layer2/block0/conv1'\] must list 20 channel indices in "
                     r"\[0, 16\) naming every old channel"):
    surgery.widen(m, "layer2/.*", width=20, sources={"layer2/block0/conv1": [0] * 20})
  spec = mbconv_spec()  # stage1/block0 as in EfficientNet's first stage: no expansion conv
  no_expansion = random_model(dataclasses.replace(spec, stages=(dataclasses.replace(
      spec.stages[0], blocks=(dataclasses.replace(spec.stages[0].blocks[0], width=8),)),)))
  with pytest.raises(ValueError, match="cannot widen the inner channels of stage1/block0: it has no "
                     "expansion conv"):
    surgery.widen(no_expansion, "stage1/block0", factor=2)
  grouped = random_model(shrink(resnet_spec((1, 1, 1, 1), "bottleneck", 5, groups=2, width_per_group=8)))
  with pytest.raises(ValueError, match=r"cannot widen layer1/block0: grouped convs \(groups=2\)"):
    surgery.widen(grouped, "layer1/block0", factor=2)
  with pytest.raises(ValueError, match=r"out= widens one stage, but 'layer\[23\]' matched"):
    surgery.widen_stage(m, "layer[23]", out=64)
  with pytest.raises(surgery.PathError, match="nearest valid paths"):
    surgery.widen_stage(m, "layr2", factor=2)
  before = fingerprint(m)
  with pytest.raises(ValueError, match=r"sources names no stream \['layer9'\]"):
    surgery.widen_stage(m, "layer2", factor=2, sources={"layer9": [0]})
  assert fingerprint(m) == before


# --------------------------------------------------------------------------------------------------
# Real and full-size networks.


def _cifar_resnet(shared_dir: Path, depth: int):
  from jaxft.convert import convert_file  # pylint: disable=g-import-not-at-top
  found = sorted((shared_dir / "weights" / "cifar-resnet").glob(f"resnet{depth}-*.th"))
  if not found:
    pytest.skip(f"resnet{depth} checkpoint missing from ../shared")
  return convert_file(found[0], f"cifar_resnet{depth}")


def test_real_cifar_resnet20_widened(shared_dir):
  m = _cifar_resnet(shared_dir, 20)
  inner = run(surgery.widen, m, factor=1.5, noise=0.05, seed=1, expect=9)
  stage = run(surgery.widen_stage, inner, ".*", factor=2, seed=2)
  assert [st.blocks[0].out for st in stage.spec.stages] == [32, 64, 128]
  check_preserved(m, stage)
  again = surgery.replay(m, json.loads(json.dumps(list(stage.history))))
  for p, v in paths.flatten(stage.variables).items():
    np.testing.assert_array_equal(paths.get(again.variables, p), v, err_msg=p)


@pytest.mark.slow
def test_real_cifar_resnet56_widened(shared_dir):
  m = _cifar_resnet(shared_dir, 56)
  out = surgery.widen_stage(surgery.widen(m, "layer[23]/.*", factor=1.25, seed=1), ".*", factor=1.5,
                            noise=0.05, seed=2)
  assert rel_err(logits(out), logits(m)) <= TOL
  ref, _ = train_apply(m)
  assert rel_err(train_apply(out)[0], ref) <= TOL


@pytest.mark.slow
def test_resnet50_widened():
  m = random_model(get_spec("resnet50", 10), 2)
  mid = surgery.widen_stage(m, "layer[34]", factor=1.25, seed=1)
  out = surgery.widen(mid, "layer3/block[0-2]", width=320, noise=0.05, seed=2, expect=3)
  # Train mode at 64 px on 16 images: with XT (8 images at 32 px) layer4's 1×1 maps give BN 8 values
  # per channel, and on AMD Zen 3 (AVX2) the widened model's logits moved by 1.9e-5, within float32
  # noise (the same model on the batch reversed: 1e-4). At 64 px × 16 the widened model is 6e-6.
  xt = jax.random.normal(jax.random.key(4), (16, 64, 64, 3))
  check_preserved(m, out, xt=xt)


@pytest.mark.slow
def test_efficientnet_lite0_widened():
  m = surgery.set_dropout(random_model(get_spec("efficientnet_lite0", 10), 2), 0.0)  # train mode: no rng
  out = surgery.widen_stage(m, "stem|stage[1-3]", factor=1.5, seed=1)  # stage1 has no expansion conv
  assert out.spec.stages[0].blocks[0].width == 48 and out.spec.stages[0].blocks[0].out == 24
  out2 = surgery.widen(out, "stage[4-7]/.*", factor=1.25, seed=2)
  # 64 px: at 32 the last stages' 1×1 maps give train-mode BN so few values that merely reversing the
  # batch order moves the logits by 2e-5 (float32 statistics); at 64 px with 8 images that floor was
  # 5e-6 on AMD Zen 3 but 1.4e-5 on Sapphire Rapids (AVX-512 summation order). With 32 images the
  # floor there (the same model on the batch reversed) is 5.9e-6 and the widened model 7.1e-6.
  x = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
  xt = jax.random.normal(jax.random.key(4), (32, 64, 64, 3))
  check_preserved(m, out2, x=x, xt=xt)
