"""Adaptive regularization strengths: the controller's rule, the values as dynamic inputs of the step
(optimizer, loss weights, dropout), logging and plotting, and an exact resume with the controller on."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from conftest import override
from jaxft import adapt, config as config_lib, optim, report
from jaxft.models import Network, create_model
from jaxft.train import controller
from jaxft.train.objective import Objective
from jaxft.train.state import TrainState
from jaxft.train.steps import StepConfig, make_train_step

f32 = np.float32


# ---------------------------------------------------------------------------------------------------
# The spec and the rule (pure)


def test_spec_is_a_canonical_string_read_back_strictly():
  text = jaxft.adaptive(1e-4, 1e-1, 0.05)
  assert text == "adaptive(0.0001, 0.1, 0.05)"
  assert adapt.parse(text) == adapt.Adaptive(1e-4, 0.1, 0.05)
  assert adapt.parse(" adaptive( 1e-4 ,1E-1, .05 ) ") == adapt.Adaptive(1e-4, 0.1, 0.05)
  assert adapt.parse(0.3) is None
  # The start is the geometric mean, as float32.
  assert adapt.Adaptive(1e-4, 1e-2, 1.0).start == float(f32(np.sqrt(1e-4 * 1e-2)))
  for bad in ("adaptive(1, 2)", "adaptive(1, 2, 3, 4)", "adaptive(1, 2, x)", "adaptive(1;2;3)",
              "adaptive(1, 2, 3)+1", "adaptive(__import__('os'), 2, 3)"):
    with pytest.raises(ValueError, match=r"is not adaptive\(min, max, target_gap\)"):
      adapt.parse(bad)


def test_rule_on_a_scripted_sequence_of_gaps():
  spec = adapt.Adaptive(1e-3, 1e-1, 0.1)  # t = 0.1; with h = 0.2 the band is [0.08, 0.12]
  f, h = 2.0, 0.2
  up, hold, down = adapt.UP, adapt.HOLD, adapt.DOWN
  # (gap, expected mode, expected value from the previous one), per the documented rule.
  v0 = f32(np.sqrt(1e-3 * 1e-1))  # 0.01
  script = [
      (0.5, up, lambda v: v * f),      # above t(1+h): up
      (0.11, up, lambda v: v * f),     # in the band, above t, going up: keeps going
      (0.1, hold, lambda v: v),        # reached t: stop
      (0.115, hold, lambda v: v),      # in the band at rest: stays at rest
      (0.0, down, lambda v: v / f),    # below t(1-h): down
      (0.09, down, lambda v: v / f),   # in the band, below t, going down: keeps going
      (0.1, hold, lambda v: v),        # reached t: stop
      (0.119, hold, lambda v: v),
      (0.121, up, lambda v: v * f),    # just above the band
      (9.0, up, lambda v: v * f),
      (9.0, up, lambda v: min(0.1, v * f)),  # clipped at max
      (9.0, up, lambda v: min(0.1, v * f)),
      (-3.0, down, lambda v: v / f),   # a negative gap (val below train): down
      (-3.0, down, lambda v: v / f),
      (-3.0, down, lambda v: v / f),
      (-3.0, down, lambda v: v / f),
      (-3.0, down, lambda v: v / f),
      (-3.0, down, lambda v: v / f),
      (-3.0, down, lambda v: max(1e-3, v / f)),  # clipped at min
      (-3.0, down, lambda v: max(1e-3, v / f)),
  ]
  value, mode = float(v0), hold
  seen = []
  for gap, want_mode, want in script:
    expected = float(f32(want(float(value))))  # float64 arithmetic, rounded to float32
    value, mode = adapt.move(value, mode, gap, spec, f, h)
    assert (value, mode) == (expected, want_mode), gap
    seen.append(value)
  assert max(seen) == float(f32(0.1)) and min(seen) == float(f32(1e-3))
  assert adapt.move(0.01, hold, 0.5, spec, 2.0, 0.2) == (float(f32(0.02)), up)  # inputs not kept


def test_start_config_puts_every_adaptive_field_at_its_start_and_mutates_nothing():
  c = config_lib.default_config()
  c.optim.weight_decay = jaxft.adaptive(1e-4, 1e-2, 0.05)
  c.loss.kd = "adaptive(0.1, 10, 0.05)"
  assert list(adapt.specs(c)) == ["loss.kd", "optim.weight_decay"]
  s = adapt.start_config(c)
  assert s.optim.weight_decay == float(f32(1e-3)) and s.loss.kd == float(f32(1.0))
  assert c.optim.weight_decay == "adaptive(0.0001, 0.01, 0.05)"  # not mutated
  values, modes = adapt.initial(adapt.specs(c))
  assert values == {"optim.weight_decay": f32(1e-3), "loss.kd": f32(1.0)}
  assert modes == {"optim.weight_decay": 0, "loss.kd": 0}


# ---------------------------------------------------------------------------------------------------
# The values in effect change training: exact optimizer updates, loss weights, dropout


def _cfg(**kw):
  c = optim.default_config()
  c.momentum = 0.0
  return override(c, **kw)


def test_adaptive_weight_decay_and_l2sp_read_the_value_at_every_update_exactly():
  w = {"conv": {"kernel": jnp.asarray([1.5, -2.0], jnp.float32)}}
  w0 = {"conv": {"kernel": jnp.asarray([1.0, 1.0], jnp.float32)}}
  g = {"conv": {"kernel": jnp.asarray([0.25, 0.5], jnp.float32)}}
  lr = 0.1
  for name in ("weight_decay", "l2sp.alpha"):
    key = "optim." + name
    dyn = optim.build_optimizer(_cfg(lr=lr, **{name: 0.3}), w, total_steps=10, anchor=w0, dynamic=(name,))
    state = dyn.tx.init(w)
    updates = []
    for value in (0.3, 0.05):
      u_dyn, _ = dyn.tx.update(g, state, w, reg={key: jnp.float32(value)})
      fixed = optim.build_optimizer(_cfg(lr=lr, **{name: value}), w, total_steps=10, anchor=w0)
      u_fix, _ = fixed.tx.update(g, fixed.tx.init(w), w)
      np.testing.assert_array_equal(u_dyn["conv"]["kernel"], u_fix["conv"]["kernel"])  # bit for bit
      pulled = w["conv"]["kernel"] - (0.0 if name == "weight_decay" else w0["conv"]["kernel"])
      np.testing.assert_allclose(u_dyn["conv"]["kernel"],
                                 -lr * (g["conv"]["kernel"] + f32(value) * pulled), rtol=1e-6)
      updates.append(np.asarray(u_dyn["conv"]["kernel"]))
    assert not np.array_equal(updates[0], updates[1]), name  # the value moved the update
    with pytest.raises(ValueError, match=f"reads '{key}' at every update"):
      dyn.tx.update(g, state, w)


def test_adaptive_optimizer_values_pass_through_gradient_accumulation():
  w = {"conv": {"kernel": jnp.asarray([1.5, -2.0], jnp.float32)}}
  g = {"conv": {"kernel": jnp.asarray([0.25, 0.5], jnp.float32)}}
  opt = optim.build_optimizer(_cfg(lr=0.1, weight_decay=0.3, accumulate_steps=2), w, total_steps=10,
                              dynamic=("weight_decay",))
  state = opt.tx.init(w)
  reg = {"optim.weight_decay": jnp.float32(0.2)}
  u, state = opt.tx.update(g, state, w, reg=reg)
  np.testing.assert_array_equal(u["conv"]["kernel"], 0.0)
  u, _ = opt.tx.update(g, state, w, reg=reg)
  np.testing.assert_allclose(u["conv"]["kernel"], -0.1 * (g["conv"]["kernel"] + f32(0.2) * w["conv"]["kernel"]),
                             rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_step():
  """A train step of a tiny ResNet with kd off, ce weight adaptive, dropout adaptive, decay adaptive."""
  model = create_model("cifar_resnet8", jax.random.key(0), num_classes=3)
  from jaxft import surgery
  model = surgery.set_dropout(model, 0.3)
  cfg = _cfg(lr=0.05, weight_decay=0.01)
  opt = optim.build_optimizer(cfg, model.params, total_steps=10, dynamic=("weight_decay",))
  net = Network(model.spec)
  sc = StepConfig(crop_padding=0, flip=False, out_size=None, mean=(0.0,) * 3, std=(1.0,) * 3,
                  label_smoothing=0.0)
  step = jax.jit(make_train_step(net, opt.tx, opt.schedule, sc, seed=0, objective=Objective(ce=1.0)))
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.randint(0, 255, (4, 8, 8, 3)), jnp.uint8),
           "label": jnp.asarray([0, 1, 2, 0], jnp.int32)}

  def state(reg):
    values = {k: f32(v) for k, v in reg.items()}
    trainable, frozen = opt.split(model.params)
    return TrainState.create(trainable, frozen, model.batch_stats, opt.tx.init(trainable),
                             reg=(values, {k: np.int32(0) for k in values}))

  return step, state, batch


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_train_step_reads_the_values_in_effect_without_recompiling(tiny_step):
  step, state, batch = tiny_step
  base = {"loss.ce": 1.0, "model.dropout": 0.3, "optim.weight_decay": 0.01}
  results = {}
  for name, moved in (("base", {}), ("ce", {"loss.ce": 0.5}), ("dropout", {"model.dropout": 0.1}),
                      ("wd", {"optim.weight_decay": 0.2})):
    s, m = step(state({**base, **moved}), batch)
    results[name] = (s, m)
  assert step._cache_size() == 1  # the values are inputs: one compilation for all
  base_s, base_m = results["base"]
  assert base_m["reg/loss.ce"] == f32(1.0) and base_m["reg/optim.weight_decay"] == f32(0.01)
  # A loss weight scales the loss; the unweighted term is logged as before.
  ce_s, ce_m = results["ce"]
  np.testing.assert_allclose(ce_m["loss"], 0.5 * base_m["loss"], rtol=1e-6)
  assert ce_m["loss_ce"] == base_m["loss_ce"]
  # Each move changes the update of the parameters.
  for name in ("ce", "dropout", "wd"):
    s = results[name][0]
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(s.params), _leaves(base_s.params))), name
  # The dropout rate changes the forward pass (the loss itself), weight decay does not.
  assert results["dropout"][1]["loss"] != base_m["loss"] and results["wd"][1]["loss"] == base_m["loss"]


def test_traced_dropout_rate_keeps_and_scales_as_inverted_dropout():
  from jaxft.models import layers
  x = jnp.ones((2000,), jnp.float32)
  y = jax.jit(layers.dropout)(jax.random.key(1), x, jnp.float32(0.25))
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert abs(kept.mean() - 0.75) < 0.04


# ---------------------------------------------------------------------------------------------------
# Logging, plotting


def test_curves_plot_the_adaptive_weights(tmp_path):
  records = [{"step": s, "split": "train", "loss": 1.0 / s, "top1": 0.5, "lr": 0.1,
              "reg/optim.weight_decay": 1e-3 * s, "reg/loss.kd": 0.5} for s in (1, 2, 3)]
  records.append({"step": 3, "split": "val", "loss": 0.9, "top1": 0.4, "reg/optim.weight_decay": 9.0})
  drawn = report.plot_curves(records, tmp_path / "curves.png")
  assert drawn["adaptive weights"] == ["loss.kd", "optim.weight_decay"]
  assert (tmp_path / "curves.png").stat().st_size > 1000
  assert "adaptive weights" not in report.plot_curves(records[:0], tmp_path / "empty.png")


def _tensorboard_tags(workdir: Path) -> set[str]:
  """Scalar tags in the TensorBoard event files (TFRecord framing: length, crc, Event, crc)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in (workdir / "tensorboard").iterdir():
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      i += 12 + n + 4
  return tags


# ---------------------------------------------------------------------------------------------------
# End to end: the controller moves, is logged, and a resumed run is bit-identical


def _adaptive_config(folder, tmp, **kw):
  from test_train import tiny_config
  return tiny_config(folder, tmp, **{
      "optim.weight_decay": jaxft.adaptive(1e-4, 1e-1, 1e-3), "model.dropout": "adaptive(0.05, 0.5, 1e-3)",
      "loss.ce": "adaptive(0.25, 4, 1e-3)", "train.eval_every": 1, "adaptive.factor": 2.0, **kw})


def _train_item(workdir: Path, step: int) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "train" / "metadata").read_text())


@pytest.mark.slow
def test_resume_with_the_controller_on_is_exact(tmp_path):
  from test_train import final_params, write_folder
  from jaxft import train
  folder = write_folder(tmp_path / "data")
  straight = tmp_path / "straight"
  train.train_and_evaluate(_adaptive_config(folder, tmp_path), straight)
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(_adaptive_config(folder, tmp_path, **{"train.num_steps": 2}), resumed)
  saved = _train_item(resumed, 2)["adaptive"]
  train.train_and_evaluate(_adaptive_config(folder, tmp_path), resumed)

  a, b = final_params(straight), final_params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _train_item(straight, 4)["adaptive"] == _train_item(resumed, 4)["adaptive"]
  records = [report.read_metrics(w) for w in (straight, resumed)]
  keys = ("reg/optim.weight_decay", "reg/model.dropout", "reg/loss.ce", "adaptive_gap")
  pick = lambda rs: [(r["step"], r["split"], [r.get(k) for k in keys]) for r in rs]
  assert sorted(pick(records[0])) == sorted(pick(records[1]))
  # The controller moved before the interruption (steps 1, 2) and after it (step 3, read at step 4).
  train_wd = {r["step"]: r["reg/optim.weight_decay"] for r in records[0] if r["split"] == "train"}
  start = float(f32(np.sqrt(1e-4 * 1e-1)))
  assert train_wd[1] == start and train_wd[2] != start and train_wd[3] != train_wd[2]
  assert train_wd[4] != train_wd[3]
  assert saved["optim.weight_decay"][0] == train_wd[3]  # the checkpoint holds the moved value
  # Logged to TensorBoard too, and plotted.
  assert {"train/reg/optim.weight_decay", "train/reg/model.dropout", "val/adaptive_gap"} <= \
      _tensorboard_tags(straight)
  assert (straight / "curves.png").stat().st_size > 1000
  assert json.loads((straight / "config.json").read_text())["optim"]["weight_decay"] == \
      "adaptive(0.0001, 0.1, 0.001)"


def test_adaptive_loss_field_that_is_no_term_weight_is_refused():
  with pytest.raises(jaxft.train.TrainError, match="'nonsense' is not a loss term weight"):
    controller.check_terms({"loss.nonsense": adapt.Adaptive(1.0, 2.0, 0.1)})
  controller.check_terms({"loss.kd": adapt.Adaptive(1.0, 2.0, 0.1)})


def test_checkpoint_holds_the_adaptive_values_exactly_and_refuses_other_ones(tmp_path):
  import optax
  from jaxft import checkpoint as ckpt_lib
  model = create_model("cifar_resnet8", jax.random.key(0), num_classes=2)
  tx = optax.sgd(0.1)
  odd = f32(1 / 3)  # not a short decimal: JSON must carry every bit
  state = TrainState.create(model.params, {}, model.batch_stats, tx.init(model.params),
                            reg=({"loss.kd": odd, "optim.weight_decay": f32(1e-3)},
                                 {"loss.kd": np.int32(adapt.UP), "optim.weight_decay": np.int32(adapt.DOWN)}))
  mngr = ckpt_lib.train_manager(tmp_path, 2)
  ckpt_lib.save_train_state(mngr, state.replace(step=np.int32(3)), model)
  template = state.replace(reg={k: f32(0.5) for k in state.reg}, reg_mode={k: np.int32(0) for k in state.reg})
  back, step = ckpt_lib.resume_train_state(mngr, template)
  assert step == 3 and back.reg == state.reg and back.reg["loss.kd"].tobytes() == odd.tobytes()
  assert back.reg_mode == {"loss.kd": adapt.UP, "optim.weight_decay": adapt.DOWN}
  other = state.replace(reg={"loss.ce": f32(1.0)}, reg_mode={"loss.ce": np.int32(0)})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"adaptive weights saved: \['loss.kd', "
                     r"'optim.weight_decay'\]; this config's: \['loss.ce'\]"):
    ckpt_lib.restore_train_state(mngr, 3, other)
  mngr.close()
