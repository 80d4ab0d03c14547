"""The main job end to end on a tiny folder dataset the tests write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import override
from configs import tiny
from jaxft import checkpoint, paths, train

REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, per_class: int = 12, size: int = 32) -> Path:
  """Two classes that differ in colour, with noise."""
  rs = np.random.RandomState(0)
  for c, (name, colour) in enumerate([("blue", (20, 40, 200)), ("red", (200, 30, 20))]):
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      img = np.clip(np.array(colour) + rs.randint(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / name / f"{i:03d}.png")
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return write_folder(tmp_path_factory.mktemp("data") / "tiny")


def tiny_config(folder: Path, tmp: Path, **overrides):
  c = tiny.get_config()
  c.data.source = f"folder:{folder}"
  c.data.cache_dir = str(tmp / "cache")
  return override(c, **overrides)


def final_params(workdir: Path) -> dict[str, np.ndarray]:
  model = checkpoint.load_model(workdir)
  return {k: np.asarray(v) for k, v in paths.flatten(model.variables).items()}


def test_train_state_merges_and_splits_variables_in_one_place():
  f = lambda x: np.float32(x)
  state = train.TrainState.create({"head": {"kernel": f(1.0)}}, {"stem": {"kernel": f(2.0)}},
                                  {"stem": {"mean": f(3.0)}}, opt_state=(), ema=True)
  assert int(state.step) == 0 and state.ema.params == {"head": {"kernel": 1.0}}
  assert state.variables() == {"params": {"head": {"kernel": 1.0}, "stem": {"kernel": 2.0}},
                               "batch_stats": {"stem": {"mean": 3.0}}}
  ema = {"params": {"head": {"kernel": f(5.0)}, "stem": {"kernel": f(2.0)}},
         "batch_stats": {"stem": {"mean": f(6.0)}}}
  moved = state.with_variables(ema, ("opt",), step=7, ema_variables=ema)
  assert int(moved.step) == 7 and moved.params == {"head": {"kernel": 5.0}} and moved.opt_state == ("opt",)
  assert moved.frozen == {"stem": {"kernel": 2.0}} and moved.ema_variables() == ema
  assert state.variables()["params"]["head"]["kernel"] == 1.0  # not mutated
  with pytest.raises(ValueError, match="no EMA"):
    state.replace(ema=None).ema_variables()


def test_end_to_end_writes_metrics_plots_checkpoints(folder, tmp_path):
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(tiny_config(folder, tmp_path), workdir)
  assert result["step"] == 4 and not result["interrupted"]
  assert 0.0 <= result["top1"] <= 1.0 and set(result["per_class"]) == {"blue", "red"}
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "val"}
  assert [r["step"] for r in records if r["split"] == "val"] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in records)
  for png in ("curves.png", "confusion_matrix.png"):
    assert (workdir / png).stat().st_size > 1000
  assert list((workdir / "tensorboard").iterdir())
  # The checkpoint rebuilds the model without the config.
  model = checkpoint.load_model(workdir)
  assert model.spec.num_classes == 2 and model.meta["class_names"] == ["blue", "red"]


def test_resume_is_exact(folder, tmp_path):
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_config(folder, tmp_path), straight)
  resumed = tmp_path / "resumed"
  first = train.train_and_evaluate(tiny_config(folder, tmp_path, **{"train.num_steps": 2}), resumed)
  assert first["step"] == 2
  second = train.train_and_evaluate(tiny_config(folder, tmp_path), resumed)
  assert second["step"] == 4
  a, b = final_params(straight), final_params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_different_config_in_same_workdir_is_refused(folder, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(folder, tmp_path, **{"train.num_steps": 2}), workdir)
  with pytest.raises(train.TrainError, match=r"different config \(optim.lr"):
    train.train_and_evaluate(tiny_config(folder, tmp_path, **{"optim.lr": 0.5}), workdir)
  result = train.train_and_evaluate(
      tiny_config(folder, tmp_path, **{"optim.lr": 0.5, "train.allow_config_change": True}), workdir)
  assert result["step"] == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(folder, tmp_path, **{"train.num_steps": 2}), workdir)
  cfg = tiny_config(folder, tmp_path, **{"optim.lr": 1e30, "train.num_steps": 8,
                                         "train.checkpoint_every": 1,
                                         "train.allow_config_change": True})
  with pytest.raises(train.TrainError, match=r"(loss became (nan|inf)|the parameters became "
                                             r"non-finite) at step 3; stopped. The last "
                                             r"good checkpoint \(step 2\) is kept"):
    train.train_and_evaluate(cfg, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 2
  model = checkpoint.load_model(workdir)
  assert all(np.isfinite(np.asarray(v)).all() for v in paths.flatten(model.params).values())


def test_relative_workdir_checkpoints(folder, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # orbax refuses relative checkpoint paths; the loop must absolutise
  result = train.train_and_evaluate(tiny_config(folder, tmp_path, **{"train.num_steps": 2}), "rel/run")
  assert result["step"] == 2 and (tmp_path / "rel" / "run" / "checkpoints" / "2").is_dir()


def test_missing_data_is_one_clear_error(tmp_path):
  cfg = tiny_config(tmp_path / "nope", tmp_path)
  with pytest.raises(Exception, match="nope"):
    train.train_and_evaluate(cfg, tmp_path / "run")


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jaxft.train", *args], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


def test_cli_rejects_unknown_config_key(folder, tmp_path):
  r = _cli(["--config", "configs/tiny.py", "--config.train.bogus_key=1", "--workdir", str(tmp_path)])
  assert r.returncode != 0
  assert "bogus_key" in r.stderr


@pytest.mark.slow
def test_two_devices_match_one_device(folder, tmp_path):
  losses = {}
  for n in (1, 2):
    wd = tmp_path / f"dev{n}"
    r = _cli(["--config", "configs/tiny.py", f"--config.data.source=folder:{folder}",
              f"--config.data.cache_dir={tmp_path / 'cache'}", "--workdir", str(wd)],
             env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
    assert r.returncode == 0, r.stderr[-3000:]
    losses[n] = [json.loads(l)["loss"] for l in (wd / "metrics.jsonl").read_text().splitlines()
                 if json.loads(l)["split"] == "train"]
  assert len(losses[1]) == 4
  np.testing.assert_allclose(losses[1], losses[2], rtol=1e-4)


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(folder, tmp_path):
  wd = tmp_path / "run"
  args = ["--config", "configs/tiny.py", f"--config.data.source=folder:{folder}",
          f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.num_steps=400",
          "--config.train.checkpoint_every=0", "--config.train.eval_every=0", "--workdir", str(wd)]
  proc = subprocess.Popen([sys.executable, "-m", "jaxft.train", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-3000:]  # interrupted after saving: EX_TEMPFAIL, rerun resumes
  assert "checkpoint saved" in err
  steps = [int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 400
  r = _cli(args[:-5] + ["--config.train.num_steps=" + str(steps[0] + 2),
                        "--config.train.checkpoint_every=0", "--config.train.eval_every=0",
                        "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming {wd} from step {steps[0]}" in r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == steps[0] + 2


# ---------------------------------------------------------------------------------------------------
# Fine-tuning techniques: distillation, multi-task heads, EMA, mixing, dropout.
# ---------------------------------------------------------------------------------------------------

# blue → "cold", red → "warm": listed so that the task's label order is the reverse of the main one,
# so a head scored against the wrong labels would show.
COARSE_TASK = {"name": "coarse", "classes": ("warm", "cold"),
               "label_map": {"blue": "cold", "red": "warm"}, "weight": 0.5}


def train_records(workdir: Path, split: str = "train") -> list[dict]:
  return [r for r in (json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines())
          if r["split"] == split]


def everything_config(folder: Path, tmp: Path, **overrides):
  """KD from the pre-surgery model + a second head + EMA + mixup/cutmix + erasing + dropout."""
  return tiny_config(folder, tmp, **{
      "surgery": [{"op": "prune_channels", "blocks": "layer3/.*", "fraction": 0.5}],
      "model.dropout": 0.2, "tasks": (COARSE_TASK,),
      "distill.teacher": "base", "distill.temperature": 2.0, "loss.kd": 0.5, "loss.feature": 0.1,
      "ema.decay": 0.9, "mix.mixup_alpha": 0.2, "mix.cutmix_alpha": 1.0, "data.random_erasing": 0.5,
      **overrides})


def test_kd_ema_multitask_resume_is_exact(folder, tmp_path):
  straight = tmp_path / "straight"
  result = train.train_and_evaluate(everything_config(folder, tmp_path), straight)
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(everything_config(folder, tmp_path, **{"train.num_steps": 2}), resumed)
  train.train_and_evaluate(everything_config(folder, tmp_path), resumed)
  for load in (final_params, lambda wd: {k: np.asarray(v) for k, v in
                                         paths.flatten(train.load_ema_model(wd).variables).items()}):
    a, b = load(straight), load(resumed)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # Every term is logged on its own; the total is their weighted sum.
  rec = train_records(straight)[-1]
  terms = {"ce": 1.0, "task_coarse": 0.5, "kd": 0.5, "feature": 0.1}
  assert rec["loss"] == pytest.approx(sum(w * rec[f"loss_{k}"] for k, w in terms.items()), rel=1e-5)
  # The raw weights stay what load_model returns; the EMA differs from them and is evaluated too.
  raw, ema = checkpoint.load_model(straight), train.load_ema_model(straight)
  assert raw.spec == ema.spec and [h.name for h in raw.spec.heads] == ["head", "coarse"]
  assert raw.spec.heads[0].dropout == 0.2
  assert not np.array_equal(raw.params["head"]["kernel"], ema.params["head"]["kernel"])
  assert set(result["ema"]) >= {"top1", "loss", "top1_coarse"}
  assert result["surgery"]["flops_after"] < result["surgery"]["flops_before"]
  ops = [h["op"] for h in raw.history]
  assert ops == ["prune_channels", "set_dropout", "add_head"]


def test_multitask_metrics_per_head(folder, tmp_path):
  from jaxft import data, evaluate
  cfg = tiny_config(folder, tmp_path, **{"tasks": (COARSE_TASK,), "train.num_steps": 6,
                                         "optim.lr": 0.05})
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(cfg, workdir)
  val = train_records(workdir, "val")[-1]
  assert {"top1_coarse", "loss_coarse"} <= set(val)
  assert {"loss_task_coarse", "top1_coarse"} <= set(train_records(workdir)[-1])
  assert set(result["tasks"]["coarse"]["per_class"]) == {"warm", "cold"}
  # Recompute the coarse head's accuracy from the checkpoint against the mapped labels.
  model = checkpoint.load_model(workdir)
  assert model.meta["tasks"]["coarse"]["label_of_class"] == {"blue": "cold", "red": "warm"}
  ds = data.load_source(cfg.data.source, cache_dir=cfg.data.cache_dir)
  _, val_ds = data.split_train_val(ds, cfg.data.val_fraction, cfg.data.split_seed)
  x = data.preprocess_eval(val_ds.images, model.meta["mean"], model.meta["std"])
  heads = model.apply(x, return_all=True)["heads"]
  coarse = np.where(val_ds.labels == 0, 1, 0)  # blue → cold (1), red → warm (0)
  assert result["tasks"]["coarse"]["top1"] == pytest.approx(
      np.mean(np.argmax(heads["coarse"], -1) == coarse))
  assert result["top1"] == pytest.approx(np.mean(np.argmax(heads["head"], -1) == val_ds.labels))
  assert evaluate.evaluate(model, val_ds.images, val_ds.labels)["top1"] == pytest.approx(result["top1"])


def test_kd_student_moves_toward_a_different_architecture_teacher(folder, tmp_path):
  from jaxft import models, surgery
  teacher = surgery.replace_head(models.create_model("cifar_resnet20", jax.random.key(3)), 2, seed=3)
  checkpoint.save_model(tmp_path / "teacher", teacher)
  cfg = tiny_config(folder, tmp_path, **{
      "distill.teacher": str(tmp_path / "teacher"), "distill.temperature": 1.0, "loss.ce": 0.0,
      "loss.kd": 1.0, "train.num_steps": 16, "optim.lr": 0.05, "optim.name": "adamw",
      "optim.weight_decay": 0.0, "data.crop_padding": 0, "data.flip": False,
      "train.eval_every": 0, "train.checkpoint_every": 0})
  train.train_and_evaluate(cfg, tmp_path / "run")
  kl = [r["loss_kd"] for r in train_records(tmp_path / "run")]
  assert len(kl) == 16 and all(np.isfinite(kl))
  assert np.mean(kl[-4:]) < 0.5 * np.mean(kl[:4]), kl


def test_distillation_config_errors(folder, tmp_path):
  with pytest.raises(train.TrainError, match="need a teacher"):
    train.train_and_evaluate(tiny_config(folder, tmp_path, **{"loss.kd": 1.0}), tmp_path / "a")
  with pytest.raises(train.TrainError, match="loss.kd and loss.feature are 0"):
    train.train_and_evaluate(tiny_config(folder, tmp_path, **{"distill.teacher": "base"}),
                             tmp_path / "b")
  bad_task = dict(COARSE_TASK, label_map={"blue": "cold"})
  with pytest.raises(train.TrainError, match=r"missing \['red'\]"):
    train.train_and_evaluate(tiny_config(folder, tmp_path, **{"tasks": (bad_task,)}), tmp_path / "c")


def test_distill_config_prunes_a_third_of_the_flops(resnet56_th):
  from configs import cifar10_distill
  from jaxft import surgery
  c = cifar10_distill.get_config()
  c.model.pretrained = str(resnet56_th)
  base, student = train.build_model(c, jax.random.key(0))
  rep = surgery.report(base, student, 32)
  assert rep.flops_after <= 0.7 * rep.flops_before, str(rep)
  assert student.spec.feature_width == base.spec.feature_width
  # The variants: distil from the pretrained model as is, the no-teacher control, the teacher run.
  assert cifar10_distill.get_config("base").distill.teacher == "base"
  control = cifar10_distill.get_config("control")
  assert not control.distill.teacher and control.loss.kd == 0 and control.surgery == c.surgery
  assert cifar10_distill.get_config("teacher").surgery == []


@pytest.mark.slow
def test_multitask_config_runs_on_real_cifar(cifar_folder, resnet56_th, tmp_path):
  from configs import multitask
  c = multitask.get_config()
  c.model.pretrained = str(resnet56_th)
  c.data.source = f"folder:{cifar_folder}"
  c.data.cache_dir = str(tmp_path / "cache")
  c.train.update(batch_size=16, num_steps=3, eval_every=0, checkpoint_every=0, eval_batch_size=100)
  c.optim.schedule.warmup_steps = 1
  result = train.train_and_evaluate(c, tmp_path / "run")
  # The pretrained main head is already good on real CIFAR-10; the new coarse head has its metrics.
  assert result["top1"] > 0.7
  assert set(result["tasks"]["coarse"]["per_class"]) == {"animal", "vehicle"}
  assert 0.0 <= result["ema"]["top1_coarse"] <= 1.0


def test_bad_optimizer_setting_is_one_clear_error(folder, tmp_path):
  cfg = tiny_config(folder, tmp_path, **{"optim.schedule.kind": "warmup_cosine",
                                         "optim.schedule.warmup_steps": 20})
  with pytest.raises(train.TrainError, match=r"config.optim: .*warmup_steps \(20\) < total_steps \(4\)"):
    train.train_and_evaluate(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# What the config changes is recorded and regularised as what it is.
# ---------------------------------------------------------------------------------------------------


def _optim_config(**optim):
  from jaxft import config as config_lib
  c = config_lib.default_config()
  return override(c, **{f"optim.{k}": v for k, v in {"momentum": 0.0, **optim}.items()})


def test_l2sp_treats_a_same_shape_reinitialised_head_as_new():
  from jaxft import models, surgery
  from jaxft.train import setup
  base = models.create_model("cifar_resnet8", jax.random.key(0), num_classes=2)
  model = surgery.replace_head(base, 2, seed=5)  # same shape, fresh values (configs/cifar10_resnet56.py)
  new = {p for p, v in paths.flatten(train.new_leaf_mask(base, model)).items() if v}
  assert new == {"head/kernel", "head/bias"}
  assert not any(jax.tree.leaves(train.new_leaf_mask(base, base)))

  # One step of L2-SP away from the starting point, with zero gradients: the pretrained kernels are
  # pulled back (alpha * (w - w0)), the new head only decays (beta * w) — no pull toward the old head.
  lr, alpha, beta = 0.1, 0.5, 0.1
  opt = setup.build_optimizer(_optim_config(lr=lr, **{"l2sp.alpha": alpha, "l2sp.beta": beta}), base,
                              model, 10)
  tr, _ = opt.split(model.params)
  moved = jax.tree.map(lambda w: w + 1.0, tr)
  u, _ = opt.tx.update(jax.tree.map(np.zeros_like, tr), opt.tx.init(tr), moved)
  np.testing.assert_allclose(u["head"]["kernel"], -lr * beta * moved["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(u["stem"]["conv"]["kernel"], -lr * alpha * 1.0, rtol=1e-6)
  assert opt.table["l2sp"][1]["leaves"] == 1  # "new (beta)": the head kernel (biases: not in rules)


def test_shipped_resnet56_config_head_is_new(resnet56_th):
  from configs import cifar10_resnet56
  c = cifar10_resnet56.get_config()
  c.model.pretrained = str(resnet56_th)
  base, model = train.build_model(c, jax.random.key(0))
  new = [p for p, v in paths.flatten(train.new_leaf_mask(base, model)).items() if v]
  # replace_head(num_classes=10) on a 10-class checkpoint: the same shapes, but a new head
  assert {"head/kernel", "head/bias"} <= set(new) and any("/adapter/" in p for p in new)
  assert all(p.startswith("head/") or "/adapter/" in p for p in new), new


def test_config_spec_changes_are_in_the_evolution_log(folder, tmp_path):
  from jaxft import models, surgery
  # The pretrained checkpoint has 3 classes, the data 2: the config's num_classes replaces the head.
  checkpoint.save_model(tmp_path / "pre", models.create_model("cifar_resnet8", jax.random.key(1),
                                                              num_classes=3))
  cfg = tiny_config(folder, tmp_path, **{
      "model.pretrained": str(tmp_path / "pre"), "model.bn_momentum": 0.8, "model.dropout": 0.3,
      "train.num_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0})
  base, model = train.build_model(cfg, jax.random.key(cfg.seed))
  assert {p for p, v in paths.flatten(train.new_leaf_mask(base, model)).items() if v} == {
      "head/kernel", "head/bias"}
  train.train_and_evaluate(cfg, tmp_path / "run")
  saved = checkpoint.load_model(tmp_path / "run")
  assert saved.spec.bn_momentum == 0.8 and saved.spec.heads[0].dropout == 0.3
  assert saved.spec.num_classes == 2
  added = saved.history[len(base.history):]
  assert [h["op"] for h in added] == ["replace_head", "set_bn_momentum", "set_dropout"]
  assert surgery.replay(base, added).spec == saved.spec
