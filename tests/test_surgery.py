"""Tests of jaxft.surgery on tiny networks (one block per stage, 32×32 inputs, batch 2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import paths, surgery
from jaxft.models import (BlockSpec, HeadSpec, ModelSpec, Network, StageSpec, StemSpec,
                          cifar_resnet_spec, get_spec, resnet_spec)
from jaxft.models.model import Model
from jaxft.paths import PathError
from jaxft.surgery.select import block_index

# --------------------------------------------------------------------------------------------------
# Helpers.


def random_model(spec: ModelSpec, seed: int = 0) -> Model:
  """A model of ``spec`` with random weights, BN affines and BN statistics (so that preserved functions
  are not trivially preserved). Drawn with numpy: compiling flax's init is slow on a loaded CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: Network(spec).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  flat = {}
  for p, v in paths.flatten({k: dict(t) for k, t in shapes.items()}).items():
    is_bn = "bn" in p.split("/")[-2]
    if p.endswith("/kernel"):
      x = rng.normal(0.0, np.sqrt(2.0 / np.prod(v.shape[:-1])), v.shape)
    elif p.endswith("/scale") or p.endswith("/var"):
      x = rng.uniform(0.5, 1.5, v.shape)
    elif p.endswith("/mean") or (p.endswith("/bias") and is_bn):
      x = rng.normal(0.0, 0.3, v.shape)
    else:
      x = rng.normal(0.0, 0.1, v.shape)
    flat[p] = jnp.asarray(x, jnp.float32)
  return Model(spec, paths.unflatten(flat), meta={"input_size": 32})


def mbconv_spec(num_classes: int = 5) -> ModelSpec:
  """A two-stage inverted-residual network with a neck (EfficientNet-Lite-like, described as data)."""
  s1 = (BlockSpec("block0", "mbconv", width=16, out=8, act="relu6"),
        BlockSpec("block1", "mbconv", width=48, out=8, act="relu6"))
  s2 = (BlockSpec("block0", "mbconv", width=48, out=16, stride=2, kernel=5, act="relu6"),)
  return ModelSpec(family="efficientnet_lite",
                   stem=StemSpec(8, kernel=3, stride=2, pool=False, act="relu6"),
                   stages=(StageSpec("stage1", s1), StageSpec("stage2", s2)),
                   heads=(HeadSpec("head", num_classes),), neck_width=32, neck_act="relu6")


def shrink(spec: ModelSpec, factor: int = 8) -> ModelSpec:
  """The same structure with every width divided by ``factor`` (fast on CPU)."""
  stages = tuple(dataclasses.replace(st, blocks=tuple(
      dataclasses.replace(b, width=b.width // factor, out=b.out // factor) for b in st.blocks))
      for st in spec.stages)
  return dataclasses.replace(spec, stem=dataclasses.replace(spec.stem, width=spec.stem.width // factor),
                             stages=stages)


SPECS = {
    "basic": lambda: shrink(resnet_spec((1, 1, 1, 1), "basic", 5)),
    "bottleneck": lambda: shrink(resnet_spec((1, 1, 1, 1), "bottleneck", 5)),
    "cifar": lambda: cifar_resnet_spec(8, 5),
    "mbconv": mbconv_spec,
}
_CACHE: dict[str, Model] = {}


def tiny(name: str) -> Model:
  if name not in _CACHE:
    _CACHE[name] = random_model(SPECS[name](), 1)
  return _CACHE[name]


X = jax.random.normal(jax.random.key(42), (2, 32, 32, 3), jnp.float32)


def logits(model: Model, x: jax.Array = X, **kw) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, x: model.module().apply(v, x, **kw))(model.variables, x))


def fingerprint(model: Model) -> dict:
  """Everything an op might mutate: every leaf's bytes, the spec, meta and history."""
  leaves = {p: (np.shape(v), str(np.asarray(v).dtype), hashlib.sha256(np.asarray(v).tobytes()).digest())
            for p, v in paths.flatten(model.variables).items()}
  return {"leaves": leaves, "ids": {p: id(v) for p, v in paths.flatten(model.variables).items()},
          "spec": model.spec, "meta": json.dumps(dict(model.meta), sort_keys=True),
          "history": json.dumps(list(model.history))}


def run(op, model: Model, *args, **kwargs) -> Model:
  """Applies ``op`` and checks that ``model`` is untouched and the record is JSON-serialisable."""
  before = fingerprint(model)
  out = op(model, *args, **kwargs)
  assert fingerprint(model) == before
  assert out.history[:-1] == model.history
  assert out.history[-1]["op"] == op.__name__
  assert json.loads(json.dumps(out.history[-1])) == out.history[-1]
  return out


def assert_shared(before: Model, after: Model, touched: tuple[str, ...] = ()) -> None:
  """Every leaf outside the ``touched`` module prefixes is the very same object."""
  a, b = paths.flatten(before.variables), paths.flatten(after.variables)
  for p in b:
    module = p.split("/", 1)[1]
    if any(module == t or module.startswith(t + "/") for t in touched):
      continue
    assert p in a, p
    assert b[p] is a[p], p


# --------------------------------------------------------------------------------------------------
# Heads, activations, blocks.


@pytest.mark.parametrize("name", ["basic", "cifar"])
def test_replace_head(name):
  m = tiny(name)
  out = run(surgery.replace_head, m, 10, seed=3)
  assert out.spec.heads[0].num_classes == 10
  assert out.params["head"]["kernel"].shape == (m.spec.feature_width, 10)
  assert_shared(m, out, touched=("head",))
  assert logits(out).shape == (2, 10)
  assert out.history[-1] == {"op": "replace_head", "args": {"num_classes": 10, "head": "head",
                                                            "seed": 3}}
  # Same class count: a fresh head all the same (a different seed gives different weights).
  same = surgery.replace_head(m, 5, seed=7)
  assert not np.array_equal(same.params["head"]["kernel"], m.params["head"]["kernel"])


def test_replace_head_unknown_head():
  with pytest.raises(PathError, match=r"no head 'haed'; nearest valid heads: \['head'\]"):
    surgery.replace_head(tiny("basic"), 10, head="haed")


def test_replace_activation_selected_blocks_and_stem():
  m = tiny("basic")
  out = run(surgery.replace_activation, m, "gelu", blocks="layer[34]/.*", stem=True, expect=2)
  acts = {n: b.act for st in out.spec.stages for b in st.blocks for n in [f"{st.name}/{b.name}"]}
  assert acts == {"layer1/block0": "relu", "layer2/block0": "relu", "layer3/block0": "gelu",
                  "layer4/block0": "gelu"}
  assert out.spec.stem.act == "gelu"
  assert_shared(m, out)
  assert paths.flatten(out.variables).keys() == paths.flatten(m.variables).keys()
  assert not np.allclose(logits(out), logits(m))


def test_replace_activation_errors():
  m = tiny("basic")
  with pytest.raises(ValueError, match="unknown activation 'gleu'"):
    surgery.replace_activation(m, "gleu")
  with pytest.raises(PathError, match=r"selector 'layer\[34\]/.\*' matched 2 paths, expected 3"):
    surgery.replace_activation(m, "silu", blocks="layer[34]/.*", expect=3)
  with pytest.raises(PathError, match="matched 0 paths, expected at least 1; nearest valid paths"):
    surgery.replace_activation(m, "silu", blocks="layer9/.*")


def test_replace_block_reinitialises_block_and_reshaped_downstream(caplog):
  m = tiny("basic")
  out = run(surgery.replace_block, m, "layer2/block0", {"width": 32}, seed=1)
  assert out.spec.stages[1].blocks[0].width == 32
  assert out.params["layer2"]["block0"]["conv1"]["kernel"].shape == (3, 3, 8, 32)
  assert_shared(m, out, touched=("layer2/block0",))
  assert "reinitialised" not in out.history[-1]
  # A new output width reshapes the next block's input convs: re-initialised, logged and recorded.
  with caplog.at_level(logging.WARNING, logger="jaxft.surgery"):
    out2 = run(surgery.replace_block, m, "layer2/block0", {"out": 24})
  assert out2.history[-1]["reinitialised"] == ["layer3/block0/conv1", "layer3/block0/downsample_conv"]
  assert "re-initialised layer3/block0/conv1" in caplog.text
  assert_shared(m, out2, touched=("layer2/block0", "layer3/block0/conv1",
                                  "layer3/block0/downsample_conv"))
  assert logits(out2).shape == (2, 5)


def test_replace_block_errors():
  m = tiny("basic")
  with pytest.raises(PathError, match=r"no block 'layer2/blok0'; nearest valid blocks: \['layer2/block0'"):
    surgery.replace_block(m, "layer2/blok0", {"width": 8})
  with pytest.raises(ValueError, match=r"unknown BlockSpec fields \['widht'\]"):
    surgery.replace_block(m, "layer2/block0", {"widht": 8})
  with pytest.raises(ValueError, match="keeps block names stable"):
    surgery.replace_block(m, "layer2/block0", {"name": "b"})


def test_replace_stage():
  m = tiny("bottleneck")
  new = [{"kind": "basic", "width": 8, "out": 64, "stride": 2}, {"kind": "basic", "width": 8,
                                                                 "out": 64}]
  out = run(surgery.replace_stage, m, "layer2", new, seed=2)
  assert [b.name for b in out.spec.stages[1].blocks] == ["block0", "block1"]
  assert out.spec.stages[1].blocks[0].kind == "basic"
  assert_shared(m, out, touched=("layer2",))
  assert logits(out).shape == (2, 5)


# --------------------------------------------------------------------------------------------------
# Grafts: function-preserving.


@pytest.mark.parametrize("name,stage", [("basic", "layer2"), ("bottleneck", "layer4"),
                                        ("cifar", "layer3"), ("mbconv", "stage2")])
def test_append_blocks_preserves_function(name, stage):
  m = tiny(name)
  out = run(surgery.append_blocks, m, stage, 2, seed=5)
  st = out.spec.stage(stage)
  assert [b.name for b in st.blocks][-2:] == ["block1", "block2"]
  assert all(b.stride == 1 for b in st.blocks[1:])
  assert_shared(m, out, touched=(f"{stage}/block1", f"{stage}/block2"))
  last_bn = surgery.BLOCK_KINDS[st.blocks[-1].kind].last_bn
  assert not np.any(out.params[stage]["block2"][last_bn]["scale"])
  np.testing.assert_allclose(logits(out), logits(m), atol=1e-5, rtol=0)
  # The new block is really in the graph: perturbing its zeroed scale changes the output.
  v = paths.flatten(out.variables)
  v[f"params/{stage}/block2/{last_bn}/scale"] = jnp.ones_like(v[f"params/{stage}/block2/{last_bn}/scale"])
  assert not np.allclose(logits(out.replace(variables=paths.unflatten(v))), logits(m), atol=1e-3)


def test_append_blocks_errors():
  with pytest.raises(PathError, match=r"no stage 'layr4'; nearest valid stages: \['layer4'"):
    surgery.append_blocks(tiny("basic"), "layr4")
  with pytest.raises(ValueError, match="n must be >= 1, got 0"):
    surgery.append_blocks(tiny("basic"), "layer4", 0)


def test_append_blocks_warns_when_not_preserving(caplog):
  m = surgery.replace_activation(tiny("basic"), "gelu", blocks="layer4/.*")
  with caplog.at_level(logging.WARNING, logger="jaxft.surgery"):
    out = surgery.append_blocks(m, "layer4")
  assert "the last block ends in gelu, so relu(0 + x) == x may not hold" in caplog.text
  assert not np.allclose(logits(out), logits(m), atol=1e-5)  # indeed: gelu(x) != x


@pytest.mark.parametrize("name", ["bottleneck", "cifar", "mbconv"])
def test_add_adapters_preserves_function(name):
  m = tiny(name)
  n = len(surgery.block_names(m.spec))
  out = run(surgery.add_adapters, m, ".*", width=4, expect=n)
  assert all(b.adapter == 4 for st in out.spec.stages for b in st.blocks)
  diff = surgery.diff(m, out)
  assert {e["path"].split("/")[-3] for e in diff.added} == {"adapter"}
  assert not diff.removed and not diff.reshaped and diff.num_modified == 0
  assert_shared(m, out, touched=tuple(f"{b}/adapter" for b in surgery.block_names(m.spec)))
  np.testing.assert_allclose(logits(out), logits(m), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=r"blocks already have adapters: \['"):
    surgery.add_adapters(out, ".*", width=4)


def test_add_adapters_expect_mismatch():
  with pytest.raises(PathError, match=r"selector 'layer1/.\*' matched 1 paths, expected 2"):
    surgery.add_adapters(tiny("basic"), "layer1/.*", width=4, expect=2)


def test_add_head_and_dropout():
  m = tiny("cifar")
  out = run(surgery.add_head, m, "aux", 3, seed=1)
  assert [h.name for h in out.spec.heads] == ["head", "aux"]
  assert_shared(m, out, touched=("head_aux",))
  res = jax.jit(lambda v: out.module().apply(v, X, return_all=True))(out.variables)
  assert res["heads"]["aux"].shape == (2, 3)
  np.testing.assert_allclose(np.asarray(res["logits"]), logits(m), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="head 'aux' already exists"):
    surgery.add_head(out, "aux", 3)
  with pytest.raises(ValueError, match="head name must be letters, digits or '_'"):
    surgery.add_head(out, "a/b", 3)

  d = run(surgery.set_dropout, out, 0.5, head="aux")
  assert d.spec.heads[1].dropout == 0.5 and d.spec.heads[0].dropout == 0.0
  assert_shared(out, d)
  np.testing.assert_allclose(logits(d), logits(m), atol=1e-5, rtol=0)  # eval mode: no dropout
  with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
    surgery.set_dropout(out, 1.0)


def test_set_bn_momentum():
  m = tiny("mbconv")
  out = run(surgery.set_bn_momentum, m, 0.8)
  assert out.spec.bn_momentum == 0.8 and out.spec == dataclasses.replace(m.spec, bn_momentum=0.8)
  assert_shared(m, out)
  np.testing.assert_allclose(logits(out), logits(m), atol=1e-6, rtol=0)  # eval mode: unchanged
  assert surgery.replay(m, out.history[len(m.history):]).spec == out.spec
  # and training uses it: the running mean moves by (1 - momentum) of the way to the batch mean
  stats = {}
  for model in (m, out):
    _, new = jax.jit(lambda v: model.module().apply(v, X, train=True, mutable=["batch_stats"]))(
        model.variables)
    stats[model.spec.bn_momentum] = np.asarray(new["batch_stats"]["stem"]["bn"]["mean"])
  old = np.asarray(m.batch_stats["stem"]["bn"]["mean"])
  m0 = m.spec.bn_momentum
  np.testing.assert_allclose((stats[0.8] - old) / (1 - 0.8), (stats[m0] - old) / (1 - m0), rtol=1e-4,
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"BatchNorm momentum must be in \[0, 1\).*got 1.0"):
    surgery.set_bn_momentum(m, 1.0)


# --------------------------------------------------------------------------------------------------
# Pruning.


@pytest.mark.parametrize("name", ["basic", "bottleneck", "mbconv"])
def test_remove_last_stage_refits_head(name, caplog):
  m = tiny(name)
  last = m.spec.stages[-1].name
  with caplog.at_level(logging.WARNING, logger="jaxft.surgery"):
    out = run(surgery.remove_stage, m, last, seed=4)
  assert [s.name for s in out.spec.stages] == [s.name for s in m.spec.stages[:-1]]
  rec = out.history[-1]
  # A neck keeps the feature width: then only the neck conv needs re-fitting.
  expected = ["neck_conv"] if m.spec.neck_width else ["head"]
  assert rec["reinitialised"] == expected
  assert f"re-initialised {expected[0]}" in caplog.text
  assert out.params["head"]["kernel"].shape == (out.spec.feature_width, 5)
  if not m.spec.neck_width:
    assert out.spec.feature_width < m.spec.feature_width
  assert_shared(m, out, touched=tuple(expected))
  assert logits(out).shape == (2, 5)
  assert surgery.count_params(out) < surgery.count_params(m)
  assert surgery.count_flops(out, 32) < surgery.count_flops(m, 32)


def test_remove_middle_stage_reinitialises_next_inputs():
  m = tiny("basic")
  out = run(surgery.remove_stage, m, "layer2")
  assert out.history[-1]["reinitialised"] == ["layer3/block0/conv1", "layer3/block0/downsample_conv"]
  assert logits(out).shape == (2, 5)


def test_remove_blocks():
  m = random_model(shrink(resnet_spec((2, 2, 1, 1), "basic", 5)), 2)
  out = run(surgery.remove_blocks, m, "layer[12]/block1", expect=2)
  assert [b.name for b in out.spec.stages[0].blocks] == ["block0"]
  assert "layer1/block1" not in surgery.block_names(out.spec)
  d = surgery.diff(m, out)
  assert {e["path"].split("/")[2] for e in d.removed} == {"block1"}
  assert not d.added and not d.reshaped and d.num_modified == 0
  assert_shared(m, out)
  assert logits(out).shape == (2, 5)
  with pytest.raises(ValueError, match=r"cannot remove layer2/block0 \(stride 2, 8→16 channels\): "
                     "removing a block that changes the shape"):
    surgery.remove_blocks(m, "layer2/block0")
  with pytest.raises(PathError, match=r"selector 'layer1/.\*' matched 2 paths, expected 1"):
    surgery.remove_blocks(m, "layer1/.*", expect=1)


def _zero_channels(model: Model, block: str, bns: tuple[str, ...], idx: np.ndarray) -> Model:
  """Sets scale and bias of channels ``idx`` of the given BNs to 0: those channels carry nothing."""
  flat = dict(paths.flatten(model.variables))
  for bn in bns:
    for leaf in ("scale", "bias"):
      p = f"params/{block}/{bn}/{leaf}"
      flat[p] = flat[p].at[idx].set(0.0)
  return model.replace(variables=paths.unflatten(flat))


@pytest.mark.parametrize("name,block,bns", [("basic", "layer2/block0", ("bn1",)),
                                            ("bottleneck", "layer3/block0", ("bn1", "bn2")),
                                            ("mbconv", "stage1/block1", ("bn1",))])
def test_prune_dead_channels_keeps_output(name, block, bns):
  m = tiny(name)
  i, j = block_index(m.spec, block)
  width = m.spec.stages[i].blocks[j].width
  dead = np.random.default_rng(0).choice(width, width // 4, replace=False)
  m = _zero_channels(m, block, bns, dead)
  out = run(surgery.prune_channels, m, block, keep=width - len(dead), criterion="bn_scale", expect=1)
  assert out.spec.stages[i].blocks[j].width == width - len(dead)
  np.testing.assert_allclose(logits(out), logits(m), atol=1e-5, rtol=0)
  # Kept channels are the live ones, in their original order.
  kept = np.setdiff1d(np.arange(width), dead)
  first = surgery.BLOCK_KINDS[m.spec.stages[i].blocks[j].kind].inner[0]
  old_k = paths.get(m.params, f"{block}/{first.producer}/kernel")
  new_k = paths.get(out.params, f"{block}/{first.producer}/kernel")
  np.testing.assert_array_equal(new_k, np.asarray(old_k)[..., kept])
  for coll in ("params", "batch_stats"):
    for leaf, v in paths.get(out.variables[coll], f"{block}/{bns[0]}").items():
      np.testing.assert_array_equal(v, np.asarray(paths.get(m.variables[coll],
                                                            f"{block}/{bns[0]}/{leaf}"))[kept])
  untouched = tuple(b for b in surgery.block_names(m.spec) if b != block)
  assert_shared(m, out, touched=(block,))
  assert untouched  # the rest is shared


def test_prune_channels_l1_fraction_and_errors():
  m = tiny("basic")
  out = run(surgery.prune_channels, m, "layer[34]/.*", fraction=0.25, expect=2)
  assert [b.width for st in out.spec.stages for b in st.blocks] == [8, 16, 24, 48]
  w = np.asarray(m.params["layer3"]["block0"]["conv1"]["kernel"])
  norms = np.abs(w).sum((0, 1, 2))
  kept = np.sort(np.argsort(-norms)[:24])
  np.testing.assert_array_equal(out.params["layer3"]["block0"]["conv1"]["kernel"], w[..., kept])
  np.testing.assert_array_equal(out.params["layer3"]["block0"]["conv2"]["kernel"],
                                np.asarray(m.params["layer3"]["block0"]["conv2"]["kernel"])[:, :, kept])
  assert surgery.count_params(out) < surgery.count_params(m)
  assert surgery.count_flops(out, 32) < surgery.count_flops(m, 32)
  assert logits(out).shape == (2, 5)
  with pytest.raises(ValueError, match="give exactly one of fraction="):
    surgery.prune_channels(m, fraction=0.3, keep=3)
  with pytest.raises(ValueError, match="unknown criterion 'l2'; valid: l1, bn_scale"):
    surgery.prune_channels(m, keep=3, criterion="l2")
  grouped = random_model(shrink(resnet_spec((1, 1, 1, 1), "bottleneck", 5, groups=2,
                                             width_per_group=8)))
  with pytest.raises(ValueError, match=r"cannot prune channels of layer1/block0: grouped convs "
                     r"\(groups=2\)"):
    surgery.prune_channels(grouped, "layer1/block0", keep=4)
  with pytest.raises(ValueError, match="cannot prune stage1/block0 to 8 channels: equal to its input "
                     "width"):
    surgery.prune_channels(tiny("mbconv"), "stage1/block0", keep=8)


# --------------------------------------------------------------------------------------------------
# Counting, diff, composition, replay.


def test_count_params_matches_torchvision():
  torchvision = pytest.importorskip("torchvision")
  tm = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 2, 1, 1],
                                        num_classes=5)
  spec = resnet_spec((1, 2, 1, 1), "bottleneck", 5)
  assert surgery.count_params(random_model(spec)) == sum(p.numel() for p in tm.parameters())


def test_report_and_diff_strings():
  m = tiny("cifar")
  out = surgery.prune_channels(surgery.replace_head(m, 7), "layer2/.*", keep=16)
  r = surgery.report(m, out, input_size=32)
  assert r.params_after < r.params_before and r.flops_after < r.flops_before
  assert r.params_before == surgery.count_params(m)
  assert "params" in str(r) and "FLOPs@32" in str(r)
  d = surgery.diff(m, out)
  assert [r["op"] for r in d.ops] == ["replace_head", "prune_channels"]
  reshaped = {e["path"] for e in d.reshaped}
  assert reshaped == {"params/head/kernel", "params/head/bias", "params/layer2/block0/conv1/kernel",
                      "params/layer2/block0/conv2/kernel", "params/layer2/block0/bn1/scale",
                      "params/layer2/block0/bn1/bias", "batch_stats/layer2/block0/bn1/mean",
                      "batch_stats/layer2/block0/bn1/var"}
  assert d.params_before - d.params_after == sum(e["size_before"] - e["size_after"]
                                                 for e in d.reshaped if e["path"].startswith("params"))
  s = str(d)
  assert "~ params/head/kernel" in s and "(64, 5) -> (64, 7)" in s
  assert json.loads(json.dumps(d.to_dict()))["params_after"] == d.params_after
  # Same-shaped but re-initialised leaves are counted as modified.
  d2 = surgery.diff(m, surgery.replace_head(m, 5, seed=9))
  assert [e["path"] for e in d2.modified] == ["params/head/bias", "params/head/kernel"]
  assert d2.num_modified == 2 and not d2.reshaped and not d2.added


OPS = [
    {"op": "replace_head", "num_classes": 10, "seed": 1},
    {"op": "append_blocks", "stage": "layer2", "n": 2, "seed": 2},
    {"op": "add_adapters", "blocks": "layer1/.*", "width": 4, "expect": 1},
    {"op": "add_head", "name": "aux", "num_classes": 3},
    {"op": "set_dropout", "rate": 0.1},
    {"op": "replace_activation", "act": "silu", "blocks": "layer3/.*"},
    {"op": "prune_channels", "blocks": "layer2/.*", "fraction": 0.5, "criterion": "bn_scale"},
    {"op": "remove_blocks", "blocks": "layer2/block1"},
    {"op": "remove_stage", "stage": "layer3"},
]


def test_apply_ops_composition_and_replay():
  m = tiny("cifar")
  before = fingerprint(m)
  out = surgery.apply_ops(m, OPS)
  assert fingerprint(m) == before
  assert [r["op"] for r in out.history] == [o["op"] for o in OPS]
  assert [b.name for b in out.spec.stage("layer2").blocks] == ["block0", "block2"]
  assert [s.name for s in out.spec.stages] == ["layer1", "layer2"]
  assert logits(out).shape == (2, 10)
  history = json.loads(json.dumps(list(out.history)))  # as stored in a checkpoint
  again = surgery.replay(m, history)
  assert again.spec == out.spec
  assert again.history == out.history
  a, b = paths.flatten(out.variables), paths.flatten(again.variables)
  assert a.keys() == b.keys()
  for p in a:  # every op here is deterministic given its seed
    np.testing.assert_array_equal(a[p], b[p], err_msg=p)


def test_apply_ops_errors():
  m = tiny("cifar")
  with pytest.raises(ValueError, match=r"unknown surgery op 'replace_haed'; valid ops: \['add_adapters'"):
    surgery.apply_ops(m, [{"op": "replace_haed", "num_classes": 10}])
  with pytest.raises(ValueError, match=r"op 'replace_head' has no arguments \['classes'\]"):
    surgery.apply_ops(m, [{"op": "replace_head", "classes": 10}])
  with pytest.raises(ValueError, match="has no 'op' key"):
    surgery.apply_ops(m, [{"num_classes": 10}])
  with pytest.raises(ValueError, match="unknown surgery op 'nope'"):
    surgery.replay(m, [{"op": "nope", "args": {}}])


def test_ops_accept_config_dicts():
  ml_collections = pytest.importorskip("ml_collections")
  ops = ml_collections.ConfigDict({"ops": [{"op": "replace_head", "num_classes": 4}]})
  out = surgery.apply_ops(tiny("cifar"), ops.ops)
  assert out.spec.num_classes == 4


# --------------------------------------------------------------------------------------------------
# The scenario at small scale, on the ResNet-50 structure.


@pytest.mark.slow
def test_resnet50_scenario():
  base = random_model(get_spec("resnet50", 1000), 3)
  x = X[:1]
  steps = []
  m = surgery.replace_head(base, 10)
  steps.append(m)
  ref = logits(m, x)
  m = surgery.append_blocks(m, "layer3", 2, seed=1)
  steps.append(m)
  m = surgery.add_adapters(m, "layer[34]/.*", width=16, expect=11)  # 6 + 2 grafted in layer3, 3 in layer4
  steps.append(m)
  np.testing.assert_allclose(logits(m, x), ref, atol=1e-5, rtol=0)
  m = surgery.remove_stage(m, "layer4")
  steps.append(m)
  assert m.history[-1]["reinitialised"] == ["head"]
  assert m.params["head"]["kernel"].shape == (1024, 10)
  m = surgery.prune_channels(m, "layer3/.*", fraction=0.3, expect=8)
  steps.append(m)
  assert {b.width for b in m.spec.stage("layer3").blocks} == {179}
  assert logits(m, x).shape == (1, 10)
  prev = base
  for step in steps:  # each step shown by diff
    d = surgery.diff(prev, step)
    assert len(d.ops) == 1 and str(d).startswith(f"ops: {d.ops[0]['op']}(")
    prev = step
  r = surgery.report(base, m, input_size=32)
  assert r.params_after < r.params_before and r.flops_after < r.flops_before
  again = surgery.replay(base, json.loads(json.dumps(list(m.history))))
  assert again.spec == m.spec
  assert jax.tree.structure(again.variables) == jax.tree.structure(m.variables)
  for p, v in paths.flatten(m.variables).items():
    np.testing.assert_array_equal(paths.get(again.variables, p), v, err_msg=p)

  # The evolved model still saves as a checkpoint (with its history) and evaluates with jaxft.evaluate.
  import tempfile  # pylint: disable=g-import-not-at-top
  from jaxft import checkpoint, evaluate  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save_model(f"{tmp}/evolved", m.replace(meta={**m.meta, "input_size": 32}))
    loaded = checkpoint.load_model(f"{tmp}/evolved")
  assert loaded.spec == m.spec and list(loaded.history) == json.loads(json.dumps(list(m.history)))
  images = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  out = evaluate.evaluate(loaded, images, np.array([0, 1, 2]), batch_size=2)
  assert out["n"] == 3 and out["logits"].shape == (3, 10)


# --------------------------------------------------------------------------------------------------
# Package layout.


def test_every_op_is_registered_and_exported():
  from jaxft.surgery.history import OP_MODULES  # pylint: disable=g-import-not-at-top
  names = [name for m in OP_MODULES for name in m.__all__]
  assert sorted(surgery.REGISTRY) == sorted(names) and len(set(names)) == len(names)
  for m in OP_MODULES:
    for name in m.__all__:
      assert getattr(surgery, name) is surgery.REGISTRY[name] is getattr(m, name)
      assert name in surgery.__all__


def test_import_is_lazy():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, jaxft.surgery\n"
          "assert not [m for m in sys.modules if m.startswith('jaxft.surgery.')], sorted(sys.modules)\n"
          "jaxft.surgery.replay\n"
          "assert 'jaxft.surgery.history' in sys.modules and 'jaxft.surgery.ops' in sys.modules\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
