"""Tests of LoRA surgery (``surgery.add_lora`` / ``merge_lora``): function preserved at creation, merged
logits equal unmerged ones, the base's params/FLOPs after merging, replay, default optimizer rules."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import optim, paths, surgery
from jaxft.models import LoraSpec, ModelSpec, Network, get_spec
from jaxft.models.model import Model
from jaxft.paths import PathError
from test_surgery import SPECS, X, random_model, shrink

NOT_DEPTHWISE = "(?!.*depthwise_conv).*"


def rel_err(a: jax.Array, b: jax.Array) -> float:
  """``max |a - b| / max |b|``: the error relative to the logits' scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.lru_cache(maxsize=None)
def _jitted_apply(spec: ModelSpec):
  return jax.jit(lambda v, x: Network(spec).apply(v, x))


def logits(model: Model, x: jax.Array) -> np.ndarray:
  """Eval-mode logits, jitted per spec (eager op-by-op dispatch compiles far more on CPU)."""
  return np.asarray(_jitted_apply(model.spec)(model.variables, x))


def trained(model: Model, seed: int = 1, std: float = 0.05) -> Model:
  """``model`` with random LoRA ``up`` factors, as after some training (so merging has work to do)."""
  rng = np.random.default_rng(seed)
  flat = {p: (jnp.asarray(rng.normal(0.0, std, np.shape(v)), jnp.float32) if "_lora/up/" in p else v)
          for p, v in paths.flatten(model.variables).items()}
  return model.replace(variables=paths.unflatten(flat))


@pytest.fixture(scope="module")
def resnet20(shared_dir: Path) -> Model:
  """The real pretrained CIFAR ResNet-20 from ``../shared``."""
  from jaxft.convert import convert_file  # pylint: disable=g-import-not-at-top
  found = sorted((shared_dir / "weights" / "cifar-resnet").glob("resnet20-*.th"))
  if not found:
    pytest.skip("resnet20 checkpoint missing from ../shared")
  return convert_file(found[0], "cifar_resnet20")


# The ResNet-50 and EfficientNet-Lite0 structures (every block, stride, shortcut and the neck) with
# widths divided by 8 and 4, so that they run in seconds on a shared CPU.
MODELS = {
    "resnet50": lambda: random_model(shrink(get_spec("resnet50", 10), 8), 3),
    "lite0": lambda: random_model(shrink(get_spec("efficientnet_lite0", 10), 4), 4),
}


def _check_lora_roundtrip(base: Model, modules: str, x: jax.Array) -> np.ndarray:
  """add_lora keeps the function, shares the base's leaves; merge_lora of trained factors keeps the
  unmerged function within 1e-5 relative and gives back the base's structure, params and FLOPs.
  Returns the base's logits."""
  before = jax.tree.map(np.asarray, base.variables)
  ref = logits(base, x)
  lora = surgery.add_lora(base, modules, rank=2, alpha=3.0, seed=1)  # scale 1.5: a lost scale shows
  assert lora.spec.lora and all(x.rank == 2 and x.alpha == 3.0 for x in lora.spec.lora)
  np.testing.assert_array_equal(logits(lora, x), ref)  # up starts at zero: exactly the same logits
  for p, v in paths.flatten(base.variables).items():
    assert paths.get(lora.variables, p) is v, p
  jax.tree.map(np.testing.assert_array_equal, before, base.variables)  # input not mutated
  t = trained(lora)
  unmerged = logits(t, x)
  assert rel_err(unmerged, ref) > 1e-2  # the factors do change the function
  merged = surgery.merge_lora(t)
  assert rel_err(logits(merged, x), unmerged) < 1e-5
  assert merged.spec == base.spec
  assert surgery.count_params(merged) == surgery.count_params(base)
  assert surgery.count_flops(merged, 32) == surgery.count_flops(base, 32)
  assert [r["op"] for r in merged.history] == ["add_lora", "merge_lora"]
  return ref


def test_add_and_merge_lora_real_resnet20(resnet20):
  x = X[:1]
  _check_lora_roundtrip(resnet20, ".*", x)
  lora = surgery.add_lora(resnet20, ".*", rank=2, alpha=3.0)
  assert len(lora.spec.lora) == 19  # stem + 9 blocks × 2 (option-A shortcuts have no conv)
  assert lora.params["layer1"]["block0"]["conv1_lora"]["down"]["kernel"].shape == (3, 3, 16, 2)
  assert lora.params["layer1"]["block0"]["conv1_lora"]["up"]["kernel"].shape == (1, 1, 2, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lora_and_fold_random_models(name):
  from test_fold import check_folded  # pylint: disable=g-import-not-at-top
  base = MODELS[name]()
  ref = _check_lora_roundtrip(base, NOT_DEPTHWISE, X[:1])
  check_folded(base, X[:1], ref)


def test_cpu_backend_computes_the_same_lora_network():
  from jaxft.cpu import cpu_layers  # pylint: disable=g-import-not-at-top
  m = trained(surgery.add_lora(random_model(SPECS["basic"]()), ".*", rank=2))
  a = logits(m, X)
  b = jax.jit(lambda v: Network(m.spec, layers=cpu_layers("auto")).apply(v, X))(m.variables)
  assert rel_err(b, a) < 1e-5


def test_replay_of_lora_history_is_bit_identical():
  base = random_model(SPECS["bottleneck"]())
  m = surgery.add_lora(base, "layer[12]/.*|stem/conv", rank=2, alpha=1.0, seed=7)
  m = surgery.merge_lora(m)
  m = surgery.add_lora(m, "layer3/.*", rank=3, seed=2)
  again = surgery.replay(base, json.loads(json.dumps(list(m.history))))
  assert again.spec == m.spec
  assert jax.tree.structure(again.variables) == jax.tree.structure(m.variables)
  for p, v in paths.flatten(m.variables).items():
    np.testing.assert_array_equal(paths.get(again.variables, p), v, err_msg=p)
  assert np.any(np.asarray(m.params["layer3"]["block0"]["conv2_lora"]["down"]["kernel"]))


def test_spec_round_trips_lora_and_old_specs_load():
  spec = dataclasses.replace(get_spec("cifar_resnet20"), lora=(LoraSpec("stem/conv", 2, 4.0),),
                             folded_bn=True)
  assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  old = get_spec("cifar_resnet20").to_dict()
  del old["lora"], old["folded_bn"]  # a spec saved before these fields existed
  assert ModelSpec.from_dict(old) == get_spec("cifar_resnet20")


@pytest.mark.parametrize("fold", [False, True])
def test_checkpoint_keeps_lora_and_folded_models(tmp_path, fold):
  from jaxft import checkpoint  # pylint: disable=g-import-not-at-top
  m = trained(surgery.add_lora(random_model(SPECS["cifar"]()), "layer1/.*", rank=2))
  if fold:  # no BN left: an empty batch_stats collection is saved and restored
    m = surgery.fold_batchnorm(m)
  checkpoint.save_model(tmp_path / "m", m)
  loaded = checkpoint.load_model(tmp_path / "m")
  assert loaded.spec == m.spec and loaded.spec.folded_bn == fold
  np.testing.assert_array_equal(logits(loaded, X), logits(m, X))


def test_default_optimizer_rules_train_only_lora_and_heads():
  m = surgery.add_head(surgery.add_lora(random_model(SPECS["basic"]()), "layer.*", rank=2), "aux", 3)
  cfg = optim.default_config()
  opt = optim.build_optimizer(cfg, m.params, spec=m.spec, total_steps=4)
  mask = paths.flatten(opt.trainable_mask)
  want = {p for p in mask if "_lora/" in p or p.startswith(("head/", "head_aux/"))}
  assert {p for p, t in mask.items() if t} == want and any("_lora/" in p for p in want)
  assert "layer1" in opt.frozen_bn and "stem" in opt.frozen_bn  # BN statistics frozen with them
  cfg.lr_rules = ((".*", 1.0),)  # an explicit rule set wins
  opt = optim.build_optimizer(cfg, m.params, spec=m.spec, total_steps=4)
  assert all(jax.tree.leaves(opt.trainable_mask))
  plain = random_model(SPECS["basic"]())  # no LoRA: the usual default (everything trains)
  opt = optim.build_optimizer(optim.default_config(), plain.params, spec=plain.spec, total_steps=4)
  assert all(jax.tree.leaves(opt.trainable_mask))


# --------------------------------------------------------------------------------------------------
# Bad input: one clear message each.


def test_bad_lora_arguments():
  m = random_model(SPECS["mbconv"]())
  with pytest.raises(ValueError, match="grouped/depthwise.*depthwise_conv"):
    surgery.add_lora(m, ".*", rank=2)
  with pytest.raises(ValueError, match="rank must be an int >= 1"):
    surgery.add_lora(m, "stem/conv", rank=0)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    surgery.add_lora(m, "stem/conv", rank=2, alpha=0.0)
  with pytest.raises(ValueError, match="exceeds the full rank 8 of stem/conv"):
    surgery.add_lora(m, "stem/conv", rank=9)
  with pytest.raises(PathError, match="stem/conv"):
    surgery.add_lora(m, "stem/cnv", rank=2)
  with pytest.raises(PathError):
    surgery.add_lora(m, NOT_DEPTHWISE, rank=2, expect=3)
  with pytest.raises(ValueError, match="no LoRA update to merge"):
    surgery.merge_lora(m)
  lora = surgery.add_lora(m, "stem/conv", rank=2)
  with pytest.raises(ValueError, match=r"already have LoRA: \['stem/conv'\]"):
    surgery.add_lora(lora, "stem/.*", rank=2)


def test_ops_that_would_lose_lora_refuse():
  m = surgery.add_lora(random_model(SPECS["cifar"]()), "layer2/.*", rank=2)
  with pytest.raises(ValueError, match="LoRA updates on.*merge_lora first"):
    surgery.prune_channels(m, "layer2/.*", fraction=0.5)
  with pytest.raises(ValueError, match="carry LoRA updates.*merge_lora before"):
    surgery.remove_stage(m, "layer2")
  grouped = dataclasses.replace(SPECS["mbconv"](), lora=(LoraSpec("stage1/block1/depthwise_conv", 2,
                                                                  2.0),))
  with pytest.raises(ValueError, match="grouped convs"):
    jax.eval_shape(lambda: Network(grouped).init(jax.random.key(0), X))


def test_conversion_refuses_lora_and_folded_specs():
  from jaxft.convert import ConversionError  # pylint: disable=g-import-not-at-top
  from jaxft.convert.tables import mapping_table  # pylint: disable=g-import-not-at-top
  spec = get_spec("cifar_resnet20")
  with pytest.raises(ConversionError, match="merge_lora"):
    mapping_table(dataclasses.replace(spec, lora=(LoraSpec("stem/conv", 2, 2.0),)))
  folded = mapping_table(dataclasses.replace(spec, folded_bn=True))  # export writes these
  assert any(e.torch.endswith("conv1.bias") for e in folded)


def test_config_surgery_refusals_are_one_line_train_errors():
  from jaxft import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxft.train.errors import TrainError  # pylint: disable=g-import-not-at-top
  from jaxft.train.setup import build_model  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  c.model.arch, c.model.pretrained, c.model.num_classes = "cifar_resnet8", "", 10
  c.surgery = [{"op": "fold_batchnorm"}, {"op": "append_blocks", "stage": "layer1"}]
  with pytest.raises(TrainError, match=r"^config.surgery: append_blocks needs BatchNorm layers"):
    build_model(c, jax.random.key(0))
  c.surgery = [{"op": "add_lora", "modules": "layer1/.*", "rank": 0}]
  with pytest.raises(TrainError, match=r"^config.surgery: LoRA rank must be an int >= 1, got 0$"):
    build_model(c, jax.random.key(0))


@pytest.mark.slow
def test_training_a_lora_model_moves_only_the_factors_and_the_head(tmp_path):
  from jaxft import checkpoint, train  # pylint: disable=g-import-not-at-top
  from jaxft.models import create_model  # pylint: disable=g-import-not-at-top
  from test_train import tiny_config, write_folder  # pylint: disable=g-import-not-at-top
  start = surgery.add_lora(create_model("cifar_resnet8", jax.random.key(0), num_classes=2), "layer3/.*",
                           rank=2)
  checkpoint.save_model(tmp_path / "start", start)
  folder = write_folder(tmp_path / "data")
  c = tiny_config(folder, tmp_path, **{"model.pretrained": str(tmp_path / "start"),
                                        "train.num_steps": 2, "train.eval_every": 0,
                                        "train.checkpoint_every": 2})
  train.train_and_evaluate(c, tmp_path / "run")
  end = paths.flatten(checkpoint.load_model(tmp_path / "run").variables)
  moved = {p for p, v in paths.flatten(start.variables).items()
           if not np.array_equal(np.asarray(v), end[p])}
  assert moved and all("_lora/" in p or p.startswith("params/head/") for p in moved), sorted(moved)
  assert any("_lora/up/" in p for p in moved)  # the zero factor starts learning
  assert not any(p.startswith("batch_stats/") for p in moved)  # frozen BNs keep their statistics


def test_replay_of_widen_lora_merge_prune_is_bit_identical(resnet20: Model):
  evolved = surgery.widen(resnet20, "layer2/.*", factor=2, noise=0.01, seed=3)
  evolved = surgery.add_lora(evolved, "layer3/.*/conv1", rank=2, seed=1)
  # Trained-looking factors, so that merge has something to fold in.
  flat = {k: (v + 0.01 if "_lora/up" in k else v) for k, v in paths.flatten(evolved.variables).items()}
  evolved = surgery.merge_lora(evolved.replace(variables=paths.unflatten(flat)))
  evolved = surgery.prune_channels(evolved, "layer1/.*", fraction=0.25)
  records = json.loads(json.dumps(list(evolved.history[len(resnet20.history):])))
  assert [r["op"] for r in records] == ["widen", "add_lora", "merge_lora", "prune_channels"]
  # Replayed on the base, the merge folds in the replayed (zero) factors: structure and every other
  # leaf must match exactly; with the same factors injected, the whole model does.
  replayed = surgery.replay(resnet20, records[:2])
  flat = {k: (v + 0.01 if "_lora/up" in k else v) for k, v in paths.flatten(replayed.variables).items()}
  replayed = surgery.replay(replayed.replace(variables=paths.unflatten(flat)), records[2:])
  assert replayed.spec == evolved.spec
  a, b = paths.flatten(replayed.variables), paths.flatten(evolved.variables)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
