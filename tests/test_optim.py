"""Tests of jaxft.optim: exact numbers on trees of scalars, and the semantics on a real CIFAR ResNet-20."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import override
from jaxft import optim, paths
from jaxft.models import BlockSpec, HeadSpec, ModelSpec, Network, StageSpec, StemSpec, create_model


def f32(x):
  return jnp.asarray(x, jnp.float32)


def config(**kw):
  """An optim config: plain SGD (no momentum), constant lr, everything else off, then ``kw``."""
  c = optim.default_config()
  c.momentum = 0.0
  return override(c, **kw)


def one_step(cfg, params, grads, **kw):
  opt = optim.build_optimizer(cfg, params, total_steps=100, **kw)
  trainable, frozen = opt.split(params)
  grads, _ = opt.split(grads)
  updates, state = opt.tx.update(grads, opt.tx.init(trainable), trainable)
  return opt, updates, state


# ---------------------------------------------------------------------------------------------------
# Tiny trees


def test_clip_by_global_norm_exact():
  params = {"a": f32([1.0, 1.0]), "b": f32(1.0)}
  grads = {"a": f32([3.0, 0.0]), "b": f32(4.0)}  # global norm 5
  _, u, _ = one_step(config(lr=1.0, clip_norm=1.0), params, grads)
  np.testing.assert_allclose(u["a"], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(u["b"], -0.8, rtol=1e-6)
  _, u, _ = one_step(config(lr=1.0, clip_norm=10.0), params, grads)  # under the limit: untouched
  np.testing.assert_allclose(u["a"], [-3.0, 0.0], rtol=1e-6)


def _l2_in_loss(cfg, w, g, wd):
  """One step of the same optimizer without decoupled decay, on the gradient of loss + wd/2 |w|^2."""
  cfg = cfg.copy_and_resolve_references()
  cfg.weight_decay = 0.0
  _, u, _ = one_step(cfg, {"kernel": w}, {"kernel": g + wd * w})
  return float(u["kernel"])


def test_decoupled_decay_differs_from_l2_for_adam_and_equals_for_plain_sgd():
  w, g = f32(2.0), f32(1.0)
  # adam's first step direction is g/|g| = 1 (eps=0): decoupled -0.1*(1 + 0.1*2); L2 -0.1*(1.2/1.2).
  adam = config(name="adamw", lr=0.1, eps=0.0, weight_decay=0.1)
  _, u, _ = one_step(adam, {"kernel": w}, {"kernel": g})
  # (rel 1e-4: adam's bias correction 1 - 0.999 is inexact in float32)
  assert float(u["kernel"]) == pytest.approx(-0.12, rel=1e-4)
  assert _l2_in_loss(adam, w, g, 0.1) == pytest.approx(-0.1, rel=1e-4)
  # plain SGD: both are -0.1*(1 + 0.1*2).
  sgd = config(lr=0.1, weight_decay=0.1)
  _, u, _ = one_step(sgd, {"kernel": w}, {"kernel": g})
  assert float(u["kernel"]) == pytest.approx(-0.12, rel=1e-6)
  assert _l2_in_loss(sgd, w, g, 0.1) == pytest.approx(-0.12, rel=1e-6)


def test_weight_decay_mask_default_kernels_only():
  params = {"conv": {"kernel": f32(1.0), "bias": f32(1.0)}, "bn": {"scale": f32(1.0), "bias": f32(1.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt, u, _ = one_step(config(lr=1.0, weight_decay=0.5), params, zeros)
  assert jax.tree.map(float, u) == {"conv": {"kernel": -0.5, "bias": 0.0},
                                     "bn": {"scale": 0.0, "bias": 0.0}}
  assert opt.table["weight_decay"] == [
      {"rule": "(.*/)?kernel", "value": True, "leaves": 1, "params": 1},
      {"rule": "(no rule)", "value": False, "leaves": 3, "params": 3}]


def test_lr_multipliers_and_frozen_rule():
  params = {"head": {"kernel": f32([1.0, 1.0])}, "body": {"kernel": f32(2.0)},
            "neck_conv": {"kernel": f32(3.0)}}
  grads = {"head": {"kernel": f32([0.2, -0.4])}, "body": {"kernel": f32(1.0)},
           "neck_conv": {"kernel": f32(0.2)}}
  cfg = config(lr=0.5, lr_rules=(("head/.*", 10.0), ("body/.*", "frozen")))
  opt, u, state = one_step(cfg, params, grads)
  np.testing.assert_allclose(u["head"]["kernel"], [-1.0, 2.0], rtol=1e-6)  # -0.5 * 10 * g
  assert float(u["neck_conv"]["kernel"]) == pytest.approx(-0.1)             # -0.5 * 1 * g
  assert "body" not in u
  assert opt.trainable_mask == {"head": {"kernel": True}, "body": {"kernel": False},
                                "neck_conv": {"kernel": True}}
  assert opt.multipliers == {"head": {"kernel": 10.0}, "neck_conv": {"kernel": 1.0}}
  assert opt.table["lr"] == [
      {"rule": "head/.*", "value": 10.0, "leaves": 1, "params": 2},
      {"rule": "body/.*", "value": "frozen", "leaves": 1, "params": 1},
      {"rule": ".*", "value": 1.0, "leaves": 1, "params": 1}]


def test_frozen_leaves_have_no_state_and_never_change():
  params = {"a": {"kernel": f32([1.0, 2.0])}, "b": {"kernel": f32([3.0, 4.0]), "bias": f32(5.0)}}
  cfg = config(name="adamw", lr=0.1, weight_decay=0.1, lr_rules=(("b/.*", "frozen"),))
  opt = optim.build_optimizer(cfg, params, total_steps=10)
  trainable, frozen = opt.split(params)
  assert trainable == {"a": {"kernel": params["a"]["kernel"]}}
  state = opt.tx.init(trainable)
  # adam's mu and nu for the 2 trainable numbers, adam's and the schedule's step counts: nothing for
  # the 3 frozen numbers.
  assert sum(np.size(x) for x in jax.tree.leaves(state)) == 2 + 2 + 1 + 1
  assert all("b" not in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state))

  def loss(tr, fr):
    p = optim.merge(tr, fr)
    return jnp.sum(p["a"]["kernel"] * p["b"]["kernel"]) + p["b"]["bias"]

  for _ in range(3):
    g = jax.grad(loss)(trainable, frozen)
    assert jax.tree.structure(g) == jax.tree.structure(trainable)
    u, state = opt.tx.update(g, state, trainable)
    trainable = optax.apply_updates(trainable, u)
  out = optim.merge(trainable, frozen)
  assert out["b"]["kernel"] is params["b"]["kernel"] and out["b"]["bias"] is params["b"]["bias"]
  assert not np.array_equal(out["a"]["kernel"], params["a"]["kernel"])


def test_partition_merge_round_trip_and_errors():
  params = {"a": {"x": f32(1.0), "y": f32(2.0)}, "b": f32(3.0)}
  mask = {"a": {"x": True, "y": False}, "b": False}
  tr, fr = optim.partition(params, mask)
  assert tr == {"a": {"x": params["a"]["x"]}} and fr == {"a": {"y": params["a"]["y"]}, "b": params["b"]}
  assert optim.merge(tr, fr) == params
  with pytest.raises(ValueError, match=r"paths in only one of them: \['b'\]"):
    optim.partition(params, {"a": {"x": True, "y": False}})
  with pytest.raises(ValueError, match=r"paths both trainable and frozen: \['b'\]"):
    optim.merge({"b": f32(1.0)}, {"b": f32(1.0)})


def test_l2sp_pull_toward_anchor_exact():
  params = {"old": {"kernel": f32(3.0), "bias": f32(1.0)}, "new": {"kernel": f32(2.0)}}
  anchor = {"old": {"kernel": f32(1.0), "bias": f32(0.0)}}  # "new" is not in the anchor: a new leaf
  zeros = jax.tree.map(jnp.zeros_like, params)
  cfg = config(lr=0.1, **{"l2sp.alpha": 0.5, "l2sp.beta": 0.1})
  opt, u, state = one_step(cfg, params, zeros, anchor=anchor)
  # old kernel: -0.1 * 0.5 * (3 - 1); new kernel: -0.1 * 0.1 * 2; biases are not in l2sp.rules.
  assert float(u["old"]["kernel"]) == pytest.approx(-0.1)
  assert float(u["new"]["kernel"]) == pytest.approx(-0.02)
  assert float(u["old"]["bias"]) == 0.0
  (l2,) = [s for s in state if isinstance(s, optim.L2SPState)]
  assert float(l2.anchor["old"]["kernel"]) == 1.0
  assert np.shape(l2.anchor["new"]["kernel"]) == ()
  # The same leaf marked new by a rule instead: beta * w.
  cfg.l2sp.new_rules = (("old/kernel", True),)
  _, u, _ = one_step(cfg, params, zeros, anchor=anchor)
  assert float(u["old"]["kernel"]) == pytest.approx(-0.1 * 0.1 * 3.0)


def test_l2sp_anchor_shape_mismatch():
  cfg = config(**{"l2sp.alpha": 0.5})
  with pytest.raises(ValueError, match=r"L2-SP anchor of 'kernel' has shape \(2,\), the parameter \(\)"):
    optim.build_optimizer(cfg, {"kernel": f32(1.0)}, total_steps=10, anchor={"kernel": f32([1.0, 1.0])})


def test_schedules():
  def at(steps, total=110, **kw):
    s = optim.make_schedule(config(lr=1.0, **{f"schedule.{k}": v for k, v in kw.items()}), total)
    return [float(s(t)) for t in steps]

  np.testing.assert_allclose(at([0, 5, 10, 60, 110, 200], kind="warmup_cosine", warmup_steps=10),
                             [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
  # end_factor 0.2: cos at t=1/2 is halfway between 1 and 0.2.
  np.testing.assert_allclose(at([60, 110], kind="warmup_cosine", warmup_steps=10, end_factor=0.2),
                             [0.6, 0.2], atol=1e-6)
  np.testing.assert_allclose(at([10, 35, 110], kind="linear", warmup_steps=10, end_factor=0.2),
                             [1.0, 0.8, 0.2], atol=1e-6)
  np.testing.assert_allclose(at([0, 29, 30, 59, 60], kind="step", boundaries=(30, 60), factor=0.1),
                             [1.0, 1.0, 0.1, 0.1, 0.01], rtol=1e-6)
  np.testing.assert_allclose(at([0, 2, 4, 50], kind="constant", warmup_steps=4), [0.0, 0.5, 1.0, 1.0])
  with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid: constant, warmup_cosine"):
    at([0], kind="cosine")
  with pytest.raises(ValueError, match=r"needs warmup_steps \(10\) < total_steps \(10\)"):
    at([0], total=10, kind="linear", warmup_steps=10)


def test_accumulation_equals_big_batch():
  # Loss 1/2 mean((w x - y)^2) at w = 0, y = 1: the gradient is -mean(x); big batch x = 1..4 gives -2.5,
  # micro-batches [1, 2] and [3, 4] give -1.5 and -3.5, whose mean is -2.5.
  x, y = f32([1.0, 2.0, 3.0, 4.0]), f32([1.0, 1.0, 1.0, 1.0])
  loss = lambda p, x, y: 0.5 * jnp.mean((p["w"] * x - y) ** 2)
  opt = optim.build_optimizer(config(lr=0.1, accumulate_steps=2), {"w": f32(0.0)}, total_steps=10)
  params = {"w": f32(0.0)}
  state = opt.tx.init(params)
  for i, sl in enumerate((slice(0, 2), slice(2, 4))):
    u, state = opt.tx.update(jax.grad(loss)(params, x[sl], y[sl]), state, params)
    params = optax.apply_updates(params, u)
    if i == 0:
      assert float(params["w"]) == 0.0
  assert float(params["w"]) == pytest.approx(0.25)


def test_optimizers_build_and_move_downhill():
  for name in ("sgd", "adamw", "lamb", "lion"):
    _, u, _ = one_step(config(name=name, lr=0.1, momentum=0.9, nesterov=True),
                       {"kernel": f32([1.0, -1.0])}, {"kernel": f32([1.0, -1.0])})
    assert float(u["kernel"][0]) < 0 < float(u["kernel"][1]), name


def test_seed_recipe():
  c = optim.seed_recipe()
  assert (c.name, c.lr, c.momentum, c.weight_decay, c.clip_norm) == ("sgd", 1e-3, 0.9, 5e-4, 1.0)
  with pytest.raises(AttributeError):
    c.learning_rate = 1.0  # locked: unknown keys are errors


def test_l2sp_new_leaf_mask_and_new_rules_both_mark_new():
  params = {"a": {"kernel": f32(3.0)}, "b": {"kernel": f32(3.0)}, "c": {"kernel": f32(3.0)}}
  anchor = {"a": {"kernel": f32(1.0)}, "b": {"kernel": f32(1.0)}, "c": {"kernel": f32(1.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  cfg = config(lr=1.0, **{"l2sp.alpha": 0.5, "l2sp.beta": 0.1, "l2sp.new_rules": (("b/.*", True),)})
  mask = {"a": {"kernel": True}, "b": {"kernel": False}, "c": {"kernel": False}}
  _, u, _ = one_step(cfg, params, zeros, anchor=anchor, new_leaf_mask=mask)
  # a: new by the mask, b: new by the rule (beta * w = 0.3); c: pretrained (alpha * (3 - 1) = 1)
  assert jax.tree.map(float, u) == {"a": {"kernel": pytest.approx(-0.3)},
                                     "b": {"kernel": pytest.approx(-0.3)}, "c": {"kernel": -1.0}}


UNMATCHED = {
    "lr_rules": {"lr_rules": (("head/.*", 10.0), ("haed/.*", 2.0))},
    "wd_rules": {"weight_decay": 0.1, "wd_rules": (("body/kernal", True),)},
    "l2sp.rules": {"l2sp.alpha": 0.1, "l2sp.rules": (("body/kernal", True),)},
    "l2sp.new_rules": {"l2sp.alpha": 0.1, "l2sp.new_rules": (("haed/.*", True),)},
}


@pytest.mark.parametrize("what", sorted(UNMATCHED))
def test_a_rule_that_matches_nothing_is_an_error_unless_allowed(what):
  params = {"head": {"kernel": f32(1.0)}, "body": {"kernel": f32(1.0)}}
  cfg = config(**UNMATCHED[what])
  bad = UNMATCHED[what][what][-1][0]
  with pytest.raises(ValueError, match=rf"^{re.escape(what)} rule '{re.escape(bad)}' matches no "
                                       r"parameter \(nearest: [^)]*(head|body)[^)]*\)\. Fix the regex.*"
                                       r"allow_unmatched_rules=True$"):
    optim.build_optimizer(cfg, params, total_steps=10)
  cfg.allow_unmatched_rules = True
  optim.build_optimizer(cfg, params, total_steps=10)


def test_unused_rules_and_rules_matching_only_frozen_leaves_are_no_error():
  params = {"head": {"kernel": f32(1.0)}, "body": {"kernel": f32(1.0)}}
  # weight decay and L2-SP off: their rules are not read; a wd rule matching only frozen leaves is fine
  optim.build_optimizer(config(wd_rules=(("nothing", True),), **{"l2sp.rules": (("nothing", True),)}),
                        params, total_steps=10)
  optim.build_optimizer(config(weight_decay=0.1, wd_rules=(("body/.*", True),),
                               lr_rules=(("body/.*", "frozen"),)), params, total_steps=10)


def test_rule_errors():
  params = {"head": {"kernel": f32(1.0)}, "body": {"kernel": f32(1.0)}}
  with pytest.raises(paths.PathError, match=r"1 leaves match no rule: \['body/kernel'\]"):
    optim.build_optimizer(config(lr_rules=(("head/.*", 10.0),), lr_default=None), params, total_steps=10)
  with pytest.raises(ValueError, match=r"invalid selector regex 'head/\(': missing \)"):
    optim.build_optimizer(config(lr_rules=(("head/(", 10.0),)), params, total_steps=10)
  with pytest.raises(ValueError, match="value of 'head/.*' must be a number or 'frozen', got 'freeze'"):
    optim.build_optimizer(config(lr_rules=(("head/.*", "freeze"),)), params, total_steps=10)
  with pytest.raises(ValueError, match="nothing to train"):
    optim.build_optimizer(config(lr_rules=((".*", "frozen"),)), params, total_steps=10)
  with pytest.raises(ValueError, match="unknown optimizer 'adam'; valid: sgd, adamw, lamb, lion"):
    optim.build_optimizer(config(name="adam"), params, total_steps=10)
  with pytest.raises(ValueError, match="wd_rules: value of '.*' must be True or False, got 0.5"):
    optim.build_optimizer(config(weight_decay=0.1, wd_rules=((".*", 0.5),)), params, total_steps=10)
  with pytest.raises(ValueError, match="llrd needs the ModelSpec"):
    optim.build_optimizer(config(llrd=0.5), params, total_steps=10)


# ---------------------------------------------------------------------------------------------------
# Layer-wise lr decay on a spec


def _tiny_spec(blocks_per_stage=(2, 2)) -> ModelSpec:
  stages = tuple(StageSpec(f"layer{i + 1}", tuple(
      BlockSpec(f"block{j}", "basic", 4 * (i + 1), 4 * (i + 1), stride=2 if (j == 0 and i) else 1)
      for j in range(n))) for i, n in enumerate(blocks_per_stage))
  return ModelSpec("cifar_resnet", StemSpec(4, kernel=3, stride=1, pool=False), stages,
                   (HeadSpec("head", 3),), shortcut="option_a")


def _ones_params(spec: ModelSpec):
  """Params of ``spec`` filled with ones (shapes by tracing only: no compile, fast on CPU)."""
  shapes = jax.eval_shape(Network(spec).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


def test_llrd_multipliers_follow_the_structure():
  spec = _tiny_spec()
  params = _ones_params(spec)
  m = optim.llrd_multipliers(spec, params, 0.5)
  # stem is 5 units from the head: stem, l1b0, l1b1, l2b0, l2b1 | head.
  assert m["stem"]["conv"]["kernel"] == 0.5 ** 5 and m["stem"]["bn"]["scale"] == 0.5 ** 5
  assert m["layer1"]["block0"]["conv1"]["kernel"] == 0.5 ** 4
  assert m["layer1"]["block1"]["bn2"]["bias"] == 0.5 ** 3
  assert m["layer2"]["block0"]["conv2"]["kernel"] == 0.5 ** 2
  assert m["layer2"]["block1"]["conv1"]["kernel"] == 0.5
  assert m["head"] == {"kernel": 1.0, "bias": 1.0}
  # Append a block to layer2 (as surgery would): everything below it moves one unit further away.
  st = spec.stages[1]
  grown = dataclasses.replace(spec, stages=(spec.stages[0], dataclasses.replace(
      st, blocks=st.blocks + (dataclasses.replace(st.blocks[1], name="block2"),))))
  m2 = optim.llrd_multipliers(grown, _ones_params(grown), 0.5)
  assert m2["stem"]["conv"]["kernel"] == 0.5 ** 6
  assert m2["layer2"]["block1"]["conv1"]["kernel"] == 0.5 ** 2
  assert m2["layer2"]["block2"]["conv1"]["kernel"] == 0.5
  with pytest.raises(ValueError, match="parameter 'extra/kernel' belongs to no unit of the spec"):
    optim.llrd_multipliers(spec, {**params, "extra": {"kernel": f32(1.0)}}, 0.5)


def test_llrd_times_rule_multiplier_in_the_update():
  spec = _tiny_spec()
  params = ones = _ones_params(spec)
  cfg = config(lr=1.0, llrd=0.5, lr_rules=(("head/.*", 10.0),))
  opt, u, _ = one_step(cfg, params, ones, spec=spec)
  np.testing.assert_allclose(u["head"]["bias"], -10.0 * np.ones(3))
  np.testing.assert_allclose(u["layer1"]["block0"]["conv1"]["kernel"], -(0.5 ** 4), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# A real CIFAR ResNet-20


@pytest.fixture(scope="module")
def resnet20():
  return create_model("cifar_resnet20", jax.random.PRNGKey(0), num_classes=10)


def _batch():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  return x, jnp.array([3, 7])


def _grad_fn(spec, frozen_bn, layers=None):
  net = Network(spec, frozen_bn=frozen_bn, **({} if layers is None else {"layers": layers}))

  def loss(trainable, frozen, batch_stats, x, y):
    variables = {"params": optim.merge(trainable, frozen), "batch_stats": batch_stats}
    logits, new = net.apply(variables, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

  return jax.grad(loss, has_aux=True)


def _count_convs(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "conv_general_dilated"
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_convs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_convs(sub)
  return n


def test_frozen_part_gets_no_gradient_computation(resnet20):
  x, y = _batch()
  convs = {}
  for name, rules in (("all", ()), ("frozen", (("(stem|layer1)/.*", "frozen"),))):
    opt = optim.build_optimizer(config(lr_rules=rules), resnet20.params, spec=resnet20.spec, total_steps=10)
    tr, fr = opt.split(resnet20.params)
    g = _grad_fn(resnet20.spec, opt.frozen_bn)
    # plain layers: every gradient is a visible conv primitive (the CPU paths: tests/test_conv_impl.py)
    convs[name] = _count_convs(jax.make_jaxpr(g)(tr, fr, resnet20.batch_stats, x, y).jaxpr)
  # ResNet-20 has 19 convs (stem + 9 blocks x 2; option-A shortcuts have none). All trainable: 19
  # forward + 19 kernel gradients + 18 input gradients (none for the image). Stem and layer1 (7 convs)
  # frozen: 19 forward + 12 kernel gradients + 11 input gradients (none into layer1's output).
  assert convs == {"all": 19 + 19 + 18, "frozen": 19 + 12 + 11}


def test_frozen_bn_statistics_in_a_train_step(resnet20):
  cfg = config(lr_rules=(("(stem|layer1)/.*", "frozen"),))
  opt = optim.build_optimizer(cfg, resnet20.params, spec=resnet20.spec, total_steps=10)
  assert opt.frozen_bn == ("stem", "layer1")
  tr, fr = opt.split(resnet20.params)
  _, new_bs = jax.jit(_grad_fn(resnet20.spec, opt.frozen_bn))(tr, fr, resnet20.batch_stats, *_batch())
  old = paths.flatten(resnet20.batch_stats)
  for path, v in paths.flatten(new_bs).items():
    same = np.array_equal(v, old[path])
    assert same == path.startswith(("stem/", "layer1/")), path
  # Off switch, and a frozen stage whose BN affine parameters train keeps updating statistics.
  cfg.freeze_bn_stats = False
  assert optim.build_optimizer(cfg, resnet20.params, spec=resnet20.spec, total_steps=10).frozen_bn == ()
  cfg = config(lr_rules=(("layer1/.*/bn\\d/.*", 1.0), ("(stem|layer1)/.*", "frozen")))
  opt = optim.build_optimizer(cfg, resnet20.params, spec=resnet20.spec, total_steps=10)
  assert opt.frozen_bn == ("stem",)


def _layers(name):
  if name == "plain":
    return None
  from jaxft.cpu.layers import cpu_layers  # pylint: disable=g-import-not-at-top
  return cpu_layers("auto")  # passed to the Network: jaxft.cpu.enable() would be process-wide


@pytest.mark.parametrize("layers,rule,frozen_bn", [
    ("plain", "layer1/block0/.*", ("layer1/block0",)),             # a block
    ("cpu", "layer1/block0/.*", ("layer1/block0",)),               # the same on the CPU layers
    ("plain", "layer1/block0/bn1/.*", ("layer1/block0/bn1",)),     # one BN
    ("plain", "(stem|layer2/block1)/.*", ("stem", "layer2/block1")),
])
def test_frozen_bn_statistics_at_any_granularity(resnet20, layers, rule, frozen_bn):
  opt = optim.build_optimizer(config(lr_rules=((rule, "frozen"),)), resnet20.params, spec=resnet20.spec,
                              total_steps=10)
  assert opt.frozen_bn == frozen_bn
  tr, fr = opt.split(resnet20.params)
  grad = jax.jit(_grad_fn(resnet20.spec, opt.frozen_bn, _layers(layers)))
  _, new_bs = grad(tr, fr, resnet20.batch_stats, *_batch())
  old = paths.flatten(resnet20.batch_stats)
  pattern = paths.compile_pattern(rule)
  for path, v in paths.flatten(new_bs).items():
    # exactly the BNs whose parameters the rule froze keep their statistics; every other one moves
    assert np.array_equal(v, old[path]) == bool(pattern.fullmatch(path.rsplit("/", 1)[0] + "/scale")), path


def test_bn_is_frozen_names_bns_and_modules_above_them():
  from jaxft.models.network import bn_is_frozen  # pylint: disable=g-import-not-at-top
  assert bn_is_frozen("layer1/block0/bn1", ("layer1",))
  assert bn_is_frozen("layer1/block0/bn1", ("layer1/block0",))
  assert bn_is_frozen("layer1/block0/bn1", ("layer1/block0/bn1",))
  assert not bn_is_frozen("layer1/block0/bn2", ("layer1/block0/bn1",))
  assert not bn_is_frozen("layer1/block10/bn1", ("layer1/block1",))
  assert not bn_is_frozen("layer10/block0/bn1", ("layer1",))
  assert bn_is_frozen("neck_bn", ("neck",)) and bn_is_frozen("neck_bn", ("neck_bn",))
  assert not bn_is_frozen("stem/bn", ())


def test_frozen_bn_modules_with_a_neck():
  frozen = {"stem": {"bn": {"scale": True, "bias": True}, "conv": {"kernel": True}},
            "stage1": {"block0": {"bn1": {"scale": True, "bias": True},
                                  "bn2": {"scale": True, "bias": False}}},
            "neck_bn": {"scale": True, "bias": True}, "neck_conv": {"kernel": False},
            "head": {"kernel": False, "bias": False}}
  spec = ModelSpec("efficientnet_lite", StemSpec(4), (StageSpec("stage1", (
      BlockSpec("block0", "mbconv", 4, 4),)),), (HeadSpec("head", 2),), neck_width=8)
  assert optim.frozen_bn_modules(spec, frozen) == ("stem", "stage1/block0/bn1", "neck_bn")


def test_done_when_head_10x_last_stage_1x_earlier_frozen_l2sp_backbone(resnet20):
  """head at 10x lr, last stage at 1x, earlier stages frozen with frozen BN, L2-SP on the backbone."""
  lr, alpha = 0.1, 0.01
  cfg = config(lr=lr, lr_default=None,
               lr_rules=(("head/.*", 10.0), ("layer3/.*", 1.0), ("(stem|layer1|layer2)/.*", "frozen")),
               **{"l2sp.alpha": alpha, "l2sp.new_rules": (("head/.*", True),)})
  params0 = resnet20.params
  opt = optim.build_optimizer(cfg, params0, spec=resnet20.spec, total_steps=10)
  assert opt.frozen_bn == ("stem", "layer1", "layer2")
  tr, fr = opt.split(params0)
  assert set(tr) == {"layer3", "head"}
  state = opt.tx.init(tr)
  (l2,) = [s for s in state if isinstance(s, optim.L2SPState)]
  anchor = l2.anchor
  assert set(anchor) == {"layer3", "head"}  # no optimizer state at all for the frozen stages
  assert np.shape(anchor["head"]["kernel"]) == ()  # the head is new: no anchor kept
  assert np.array_equal(anchor["layer3"]["block2"]["conv2"]["kernel"],
                        params0["layer3"]["block2"]["conv2"]["kernel"])

  grad = jax.jit(_grad_fn(resnet20.spec, opt.frozen_bn))
  update = jax.jit(opt.tx.update)
  x, y = _batch()
  bs = resnet20.batch_stats
  w0 = tr
  for step in range(3):
    g, bs = grad(tr, fr, bs, x, y)
    u, state = update(g, state, tr)
    # head: -lr * 10 * g. layer3 kernels: -lr * (g + alpha (w - w0)); layer3 BN (not in l2sp.rules): -lr g.
    np.testing.assert_allclose(u["head"]["kernel"], -lr * 10 * g["head"]["kernel"], rtol=1e-5, atol=1e-9)
    k = ("layer3", "block1", "conv1", "kernel")
    w, gk, ak = (t[k[0]][k[1]][k[2]][k[3]] for t in (tr, g, w0))
    np.testing.assert_allclose(u[k[0]][k[1]][k[2]][k[3]], -lr * (gk + alpha * (w - ak)),
                               rtol=1e-5, atol=1e-9)
    if step:  # after the first step the pull is really there
      assert float(jnp.abs(w - ak).max()) > 0
    bn_u, bn_g = (t["layer3"]["block1"]["bn1"]["scale"] for t in (u, g))
    np.testing.assert_allclose(bn_u, -lr * bn_g, rtol=1e-5, atol=1e-9)
    tr = optax.apply_updates(tr, u)

  final = optim.merge(tr, fr)
  flat0, flat1 = paths.flatten(params0), paths.flatten(final)
  for path in flat0:
    assert np.array_equal(flat0[path], flat1[path]) == path.startswith(("stem/", "layer1/", "layer2/")), path
  old_bs = paths.flatten(resnet20.batch_stats)
  for path, v in paths.flatten(bs).items():
    assert np.array_equal(v, old_bs[path]) == (not path.startswith("layer3/")), path


def test_docstring_examples_run():
  import doctest
  result = doctest.testmod(optim)
  assert result.attempted >= 2 and result.failed == 0


def test_clip_norm_is_optax_clip_by_global_norm():
  r = np.random.default_rng(0)
  tree = {"k": jnp.asarray(r.normal(size=(3, 3, 16, 128)), jnp.float32),
          "b": jnp.asarray(r.normal(size=(7,)), jnp.float32), "s": jnp.float32(2.0)}
  for max_norm in (1.0, 1e6):  # clipped, and left alone
    _, got, _ = one_step(config(lr=1.0, clip_norm=max_norm), tree, tree)  # plain SGD: -clipped grad
    want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(-a, b, rtol=1e-6), got, want)
    np.testing.assert_allclose(optax.tree.norm(got), min(max_norm, optax.tree.norm(tree)), rtol=1e-5)
