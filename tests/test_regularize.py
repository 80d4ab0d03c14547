"""DELTA (``loss.delta``) and batch spectral shrinkage (``loss.bss``): the pure losses against numpy, DELTA's
channel attention against a numpy forward pass of a tiny net, training runs with both terms, exact resume
with the attention read from the checkpoint, and DELTA after surgery."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import override
from jaxft import checkpoint, losses, models, surgery, train
from jaxft.models.spec import BlockSpec, HeadSpec, ModelSpec, StageSpec, StemSpec
from jaxft.train import delta, setup
from test_train import final_params, tiny_config, write_folder


# ---------------------------------------------------------------------------------------------------------
# The pure losses.


@pytest.mark.parametrize("k", [1, 2])
def test_bss_value_and_gradient_match_numpy_svd(k):
  f = np.random.RandomState(0).randn(6, 4).astype(np.float32)
  u, s, vt = np.linalg.svd(f.astype(np.float64), full_matrices=False)
  want = np.sum(s[-k:] ** 2)
  assert float(losses.batch_spectral_shrinkage(jnp.asarray(f), k)) == pytest.approx(want, rel=1e-5)
  # d(σ_i²)/dF = 2 σ_i u_i v_iᵀ for distinct singular values.
  want_grad = sum(2 * s[i] * np.outer(u[:, i], vt[i]) for i in range(len(s) - k, len(s)))
  grad = np.asarray(jax.grad(lambda x: losses.batch_spectral_shrinkage(x, k))(jnp.asarray(f)))
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_delta_loss_matches_hand_computation():
  rs = np.random.RandomState(1)
  student = {"a": rs.randn(2, 3, 3, 4).astype(np.float32), "b": rs.randn(2, 2, 2, 5).astype(np.float32)}
  ref = {k: v + rs.randn(*v.shape).astype(np.float32) for k, v in student.items()}
  ref["c"] = rs.randn(2, 1, 1, 2).astype(np.float32)  # a reference stage not regularized
  att = {"a": rs.dirichlet(np.ones(4)).astype(np.float32), "b": rs.dirichlet(np.ones(5)).astype(np.float32)}
  want = 0.0
  for name in att:
    d = (student[name].astype(np.float64) - ref[name]) ** 2
    n, h, w, c = d.shape
    for ch in range(c):
      want += att[name][ch] * d[..., ch].sum() / (n * h * w)
  got = losses.delta_feature_loss(jax.tree.map(jnp.asarray, student), jax.tree.map(jnp.asarray, ref),
                                  jax.tree.map(jnp.asarray, att))
  assert float(got) == pytest.approx(want, rel=1e-5)
  # The reference and the attention get no gradient; the student does.
  g = jax.grad(lambda r: losses.delta_feature_loss(student, r, att))(jax.tree.map(jnp.asarray, ref))
  assert all(not np.asarray(v).any() for v in jax.tree.leaves(g))
  assert float(losses.delta_feature_loss(ref, ref, att)) == 0.0


# ---------------------------------------------------------------------------------------------------------
# DELTA's attention against a numpy forward pass of a tiny two-stage net.

W = 3  # channels of every layer of the tiny net


def _tiny_spec() -> ModelSpec:
  block = BlockSpec(name="block0", kind="basic", width=W, out=W)
  return ModelSpec(family="cifar_resnet", stem=StemSpec(width=W, kernel=3, stride=1, pool=False),
                   stages=(StageSpec("s1", (block,)), StageSpec("s2", (block,))),
                   heads=(HeadSpec("head", 2),))


def _tiny_variables(spec: ModelSpec) -> dict:
  """Random weights and non-trivial BN statistics (so eval-mode BN is not the identity)."""
  v = models.Network(spec).init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
  rs = np.random.RandomState(2)
  rand = lambda a, lo=None: (rs.uniform(0.5, 1.5, a.shape) if lo else rs.randn(*a.shape) * 0.5
                             ).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: rand(a, lo=True) if p[-1].key == "scale" else rand(a), v["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda p, a: rand(a, lo=True) if p[-1].key == "var" else rand(a), v["batch_stats"])
  return {"params": params, "batch_stats": stats}


def _np_conv(x, k):  # 3×3, stride 1, zero padding 1 (torch's); kernel HWIO
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, k.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum("nhwc,cd->nhwd", xp[:, i:i + h, j:j + w], k[i, j])
  return out


def _np_bn(x, p, s):
  return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def _np_block(x, p, s):
  h = np.maximum(_np_bn(_np_conv(x, p["conv1"]["kernel"]), p["bn1"], s["bn1"]), 0)
  h = _np_bn(_np_conv(h, p["conv2"]["kernel"]), p["bn2"], s["bn2"])
  return np.maximum(h + x, 0)


def _np_ce(features, probe, labels):
  z = features @ np.asarray(probe[0], np.float64) + np.asarray(probe[1], np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean()


def test_delta_attention_matches_a_numpy_forward_pass():
  spec, variables = _tiny_spec(), None
  variables = _tiny_variables(spec)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  rs = np.random.RandomState(3)
  batches = [(rs.randn(4, 6, 6, 3).astype(np.float32), rs.randint(0, 2, 4)) for _ in range(2)]
  temperature = 0.05
  att, probe = delta.channel_attention(models.Network(spec), variables, batches, 2, ("s1", "s2"),
                                       temperature)

  stem = lambda x: np.maximum(_np_bn(_np_conv(x, p["stem"]["conv"]["kernel"]), p["stem"]["bn"],
                                     s["stem"]["bn"]), 0)
  s2 = lambda h: _np_block(h, p["s2"]["block0"], s["s2"]["block0"])
  increase = {"s1": np.zeros(W), "s2": np.zeros(W)}
  feats = []
  for x, y in batches:
    h1 = _np_block(stem(x.astype(np.float64)), p["s1"]["block0"], s["s1"]["block0"])
    h2 = s2(h1)
    feats.append(h2.mean((1, 2)))
    base = _np_ce(h2.mean((1, 2)), probe, y)
    for c in range(W):
      keep = np.ones(W)
      keep[c] = 0.0
      increase["s1"][c] += (_np_ce(s2(h1 * keep).mean((1, 2)), probe, y) - base) / len(batches)
      increase["s2"][c] += (_np_ce((h2 * keep).mean((1, 2)), probe, y) - base) / len(batches)
  for name, inc in increase.items():
    want = np.exp(inc / temperature) / np.exp(inc / temperature).sum()
    np.testing.assert_allclose(att[name], want, rtol=2e-3, atol=1e-5, err_msg=name)
    assert att[name].max() > 1.5 / W, (name, att[name])  # not the uniform weights zeroing nothing gives

  # The probe is the ridge softmax regression's optimum on these features: its gradient is zero.
  f = np.concatenate(feats)
  y = np.concatenate([l for _, l in batches])
  w, b = (np.asarray(a, np.float64) for a in probe)
  z = f @ w + b
  prob = np.exp(z - z.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  err = (prob - np.eye(2)[y]) / len(y)
  np.testing.assert_allclose(f.T @ err + delta.PROBE_L2 * w, 0, atol=1e-4)
  np.testing.assert_allclose(err.sum(0), 0, atol=1e-4)


def test_shared_stages_after_surgery():
  base = models.create_model("cifar_resnet8", jax.random.key(0), num_classes=2)
  assert delta.shared_stages(base.spec, base.spec, 32) == ("layer1", "layer2", "layer3")
  grown = surgery.append_blocks(surgery.replace_head(base, 5), "layer2")
  assert delta.shared_stages(base.spec, grown.spec, 32) == ("layer1", "layer2", "layer3")
  cut = surgery.remove_stage(base, "layer3")
  assert delta.shared_stages(base.spec, cut.spec, 32) == ("layer1", "layer2")
  assert delta.shared_stages(base.spec, cut.spec, 32, ("layer2",)) == ("layer2",)
  wide = surgery.replace_stage(base, "layer3", [{"kind": "basic", "width": 8, "out": 96, "stride": 2}])
  assert delta.shared_stages(base.spec, wide.spec, 32) == ("layer1", "layer2")
  with pytest.raises(ValueError, match=r"'layer3' changed its output shape \(8, 8, 64\) → \(8, 8, 96\)"):
    delta.shared_stages(base.spec, wide.spec, 32, ("layer3",))


# ---------------------------------------------------------------------------------------------------------
# Training runs.


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return write_folder(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """A 'pretrained' tiny model checkpoint (random weights; DELTA only needs a reference)."""
  path = tmp_path_factory.mktemp("weights") / "resnet8"
  checkpoint.save_model(path, models.create_model("cifar_resnet8", jax.random.key(7), num_classes=2))
  return path


def regularized_config(folder: Path, tmp: Path, pretrained: Path, **overrides):
  return tiny_config(folder, tmp, **{"model.pretrained": str(pretrained), "loss.delta": 0.5,
                                     "loss.delta_batches": 2, "loss.bss": 0.1, "loss.bss_k": 2,
                                     **overrides})


def _records(workdir: Path) -> list[dict]:
  return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
          if r["split"] == "train"]


def _attention_on_disk(workdir: Path, step: int) -> dict[str, np.ndarray]:
  mngr = checkpoint.train_manager(workdir, 2)
  template = {n: np.zeros((c,), np.float32) for n, c in (("layer1", 16), ("layer2", 32), ("layer3", 64))}
  try:
    return checkpoint.restore_train_item(mngr, step, checkpoint.DELTA_ITEM, template)
  finally:
    mngr.close()


@pytest.mark.slow
def test_delta_bss_run_logs_terms_and_resumes_exactly_reading_the_attention(folder, pretrained,
                                                                           tmp_path, monkeypatch):
  straight = tmp_path / "straight"
  train.train_and_evaluate(regularized_config(folder, tmp_path, pretrained), straight)
  recs = _records(straight)
  assert len(recs) == 4
  for r in recs:
    assert r["loss_delta"] > 0 and r["loss_bss"] > 0 and np.isfinite([r["loss_delta"], r["loss_bss"]]).all()
    assert r["loss"] == pytest.approx(r["loss_ce"] + 0.5 * r["loss_delta"] + 0.1 * r["loss_bss"], rel=1e-5)

  # The stored attention is the one the run's data and seed give.
  cfg = regularized_config(folder, tmp_path, pretrained)
  base, model = train.build_model(cfg, jax.random.key(cfg.seed))
  train_ds, _ = setup.load_data(cfg)
  model, _ = setup.fit_to_data(cfg, model, train_ds)
  ref, stages = setup.build_reference(cfg, base, model)
  want = setup.delta_attention(cfg, base, ref, stages, train_ds)
  stored = _attention_on_disk(straight, 4)
  assert stored.keys() == want.keys() == {"layer1", "layer2", "layer3"}
  for k in want:
    np.testing.assert_array_equal(stored[k], want[k], err_msg=k)
    assert stored[k].sum() == pytest.approx(1.0, rel=1e-5)

  resumed = tmp_path / "resumed"
  train.train_and_evaluate(regularized_config(folder, tmp_path, pretrained, **{"train.num_steps": 2}),
                           resumed)

  def recompute(*args, **kwargs):
    raise AssertionError("a resumed run must read the DELTA attention from its checkpoint")

  monkeypatch.setattr(setup, "delta_attention", recompute)
  assert train.train_and_evaluate(regularized_config(folder, tmp_path, pretrained), resumed)["step"] == 4
  a, b = final_params(straight), final_params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for k, v in _attention_on_disk(resumed, 4).items():
    np.testing.assert_array_equal(v, stored[k], err_msg=k)


@pytest.mark.slow
def test_delta_after_surgery_uses_the_shared_stages(folder, pretrained, tmp_path):
  cfg = regularized_config(folder, tmp_path, pretrained, **{
      "surgery": [{"op": "append_blocks", "stage": "layer2", "n": 1},
                  {"op": "replace_stage", "stage": "layer3",
                   "blocks": [{"kind": "basic", "width": 8, "out": 96, "stride": 2}]}],
      "loss.bss": 0.0, "train.num_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0})
  workdir = tmp_path / "run"
  train.train_and_evaluate(cfg, workdir)
  assert all(r["loss_delta"] > 0 and "loss_bss" not in r for r in _records(workdir))
  mngr = checkpoint.train_manager(workdir, 2)
  try:
    template = {"layer1": np.zeros((16,), np.float32), "layer2": np.zeros((32,), np.float32)}
    stored = checkpoint.restore_train_item(mngr, 2, checkpoint.DELTA_ITEM, template)
  finally:
    mngr.close()
  assert set(stored) == {"layer1", "layer2"}
  with pytest.raises(train.TrainError, match="'layer3' changed its output shape"):
    train.train_and_evaluate(override(cfg, **{"loss.delta_stages": ("layer3",)}), tmp_path / "other")
