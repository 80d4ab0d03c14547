"""Tests of ``surgery.fold_batchnorm``: eval-mode logits kept within 1e-5 relative, the folded structure
(conv biases, no BN modules or statistics), LoRA through folding, replay, and the ops that need a BN."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxft import paths, surgery
from jaxft.models.model import Model
from test_lora import logits, rel_err, resnet20, trained  # noqa: F401 (a fixture)
from test_surgery import SPECS, X, random_model


def check_folded(base: Model, x: jax.Array, ref: jax.Array | None = None) -> Model:
  """fold_batchnorm keeps eval logits (``ref``: ``base``'s) within 1e-5 relative and leaves no BN
  behind; returns the folded model. (The random BN statistics make a dropped mean term show.)"""
  before = jax.tree.map(np.asarray, base.variables)
  folded = surgery.fold_batchnorm(base)
  assert rel_err(logits(folded, x), logits(base, x) if ref is None else ref) < 1e-5
  jax.tree.map(np.testing.assert_array_equal, before, base.variables)  # input not mutated
  assert folded.spec.folded_bn and folded.batch_stats == {}
  flat = paths.flatten(folded.params)
  assert not [p for p in flat if "bn" in p.split("/")[-2]]
  convs = {p.rsplit("/", 1)[0] for p in flat if p.endswith("/kernel") and np.ndim(flat[p]) == 4
           and "_lora/" not in p and "/adapter/" not in p}
  assert convs and all(f"{c}/bias" in flat for c in convs)
  n_bn_channels = sum(np.size(v) for p, v in paths.flatten(base.params).items()
                      if p.endswith("/scale"))
  assert surgery.count_params(folded) == surgery.count_params(base) - n_bn_channels
  return folded


def test_fold_real_resnet20(resnet20):
  check_folded(resnet20, X[:1])


def test_fold_keeps_lora_trainable_and_equal():
  base = random_model(SPECS["cifar"]())
  lora = trained(surgery.add_lora(base, "stem/conv|layer2/.*", rank=2, alpha=3.0))
  folded = check_folded(lora, X)
  assert folded.spec.lora == lora.spec.lora
  # Merging after folding equals folding after merging (the up factor carries the BN multiplier).
  a = logits(surgery.merge_lora(folded), X)
  b = logits(surgery.fold_batchnorm(surgery.merge_lora(lora)), X)
  assert rel_err(a, b) < 1e-5


def test_add_lora_on_folded_model():
  folded = surgery.fold_batchnorm(random_model(SPECS["mbconv"]()))
  lora = surgery.add_lora(folded, "stage2/block0/(expand|project)_conv|neck_conv", rank=2,
                          expect=3)
  np.testing.assert_array_equal(logits(lora, X), logits(folded, X))
  t = trained(lora)
  assert rel_err(logits(surgery.merge_lora(t), X), logits(t, X)) < 1e-5


def test_replay_with_fold_is_bit_identical():
  base = random_model(SPECS["cifar"]())
  m = surgery.merge_lora(surgery.add_lora(base, "layer1/.*", rank=2, seed=3))
  m = surgery.fold_batchnorm(surgery.add_lora(m, "layer3/.*", rank=2, seed=4))
  again = surgery.replay(base, json.loads(json.dumps(list(m.history))))
  assert again.spec == m.spec
  assert jax.tree.structure(again.variables) == jax.tree.structure(m.variables)
  for p, v in paths.flatten(m.variables).items():
    np.testing.assert_array_equal(paths.get(again.variables, p), v, err_msg=p)


def test_ops_that_need_batchnorm_refuse_a_folded_model():
  folded = surgery.fold_batchnorm(random_model(SPECS["basic"]()))
  for op, call in [("fold_batchnorm", lambda: surgery.fold_batchnorm(folded)),
                   ("append_blocks", lambda: surgery.append_blocks(folded, "layer1")),
                   ("prune_channels", lambda: surgery.prune_channels(folded, ".*", fraction=0.5))]:
    with pytest.raises(ValueError, match=f"{op} needs BatchNorm layers.*folded"):
      call()
