"""Model checkpoints: exact round trips, training workdirs (best/latest step), clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxft
from jaxft import checkpoint, paths
from jaxft.models import create, create_model, get_spec


@pytest.fixture(scope="module")
def model() -> jaxft.Model:
  m = create_model("cifar_resnet20", jax.random.key(0), num_classes=4)
  # Non-default BN statistics, so that restoring defaults would be caught.
  stats = jax.tree.map(lambda a: a + 0.25, m.batch_stats)
  return m.replace(variables={**m.variables, "batch_stats": stats},
                   meta={**m.meta, "source": {"file": "w.th", "sha256": "ab" * 32}, "note": [1, 2.5]},
                   history=({"op": "replace_head", "num_classes": 4, "rules": [["a", 1]]},))


def stored_meta(m: jaxft.Model) -> dict:
  """The meta a checkpoint stores: without what load_model adds about the load itself."""
  return {k: v for k, v in m.meta.items() if k not in checkpoint.LOAD_META_KEYS}


def assert_same(a: jaxft.Model, b: jaxft.Model) -> None:
  assert a.spec == b.spec
  assert stored_meta(a) == stored_meta(b)
  assert a.history == b.history
  fa, fb = paths.flatten(a.variables), paths.flatten(b.variables)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_round_trip_is_exact(model: jaxft.Model, tmp_path: Path) -> None:
  out = checkpoint.save_model(tmp_path / "ck", model)
  assert out == (tmp_path / "ck").absolute()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left behind
  loaded = jaxft.load_pretrained(tmp_path / "ck")
  assert_same(loaded, model)
  assert (loaded.meta["checkpoint_step"], loaded.meta["weights"]) == (None, "saved")
  assert isinstance(loaded.params["head"]["kernel"], np.ndarray)
  x = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  np.testing.assert_array_equal(loaded.apply(x), model.apply(x))


def test_spec_not_in_the_zoo_is_rebuilt_from_the_checkpoint(tmp_path: Path) -> None:
  spec = get_spec("cifar_resnet20", 3)
  stage = spec.stages[1]
  blocks = (dataclasses.replace(stage.blocks[0], adapter=8),) + stage.blocks[1:2]  # evolved structure
  spec = dataclasses.replace(spec, stages=(spec.stages[0], dataclasses.replace(stage, blocks=blocks),
                                           spec.stages[2]))
  m = create(spec, jax.random.key(1), {"arch": "cifar_resnet20"})
  jaxft.save_model(tmp_path / "ck", m)
  loaded = checkpoint.load_model(tmp_path / "ck")
  assert loaded.spec == spec
  assert "adapter" in loaded.params["layer2"]["block0"] and "block2" not in loaded.params["layer2"]
  assert_same(loaded, m)


def test_existing_directory_needs_force(model: jaxft.Model, tmp_path: Path) -> None:
  checkpoint.save_model(tmp_path / "ck", model)
  with pytest.raises(checkpoint.CheckpointError, match="already exists; pass --force to overwrite"):
    checkpoint.save_model(tmp_path / "ck", model)
  other = model.replace(meta={**model.meta, "note": "second"})
  checkpoint.save_model(tmp_path / "ck", other, force=True)
  assert checkpoint.load_model(tmp_path / "ck").meta["note"] == "second"


def test_unserialisable_meta_writes_nothing(model: jaxft.Model, tmp_path: Path) -> None:
  bad = model.replace(meta={**model.meta, "fn": print})
  with pytest.raises(checkpoint.CheckpointError, match="model meta/history must be JSON-serialisable"):
    checkpoint.save_model(tmp_path / "ck", bad)
  assert not (tmp_path / "ck").exists()


def test_errors_for_missing_and_foreign_paths(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="no such checkpoint: .*nowhere"):
    checkpoint.load_model(tmp_path / "nowhere")
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "file.txt").write_text("x")
  with pytest.raises(checkpoint.CheckpointError,
                     match="junk is not a jaxft checkpoint: expected the items 'model/' and 'variables/'"):
    checkpoint.load_model(tmp_path / "junk")


def test_foreign_orbax_checkpoint_with_the_same_item_names(tmp_path: Path) -> None:
  args = ocp.args.Composite(variables=ocp.args.StandardSave({"w": np.zeros(2)}),
                            model=ocp.args.JsonSave({"format": "someone.else/3"}))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
    c.save((tmp_path / "ck").absolute(), args=args)
  with pytest.raises(checkpoint.CheckpointError, match="model item has format 'someone.else/3', "
                                                       "expected 'jaxft.model/1'"):
    checkpoint.load_model(tmp_path / "ck")


def _train_workdir(workdir: Path, model: jaxft.Model, metrics: list[dict | None],
                   options: dict | None = None, metadata: dict | None = None) -> list[jaxft.Model]:
  """Writes steps 1..n as a training loop would: the jaxft items plus an optimizer state."""
  saved = []
  opts = ocp.CheckpointManagerOptions(**(options or {}))
  with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=opts,
                             metadata=metadata) as mgr:
    for step, m in enumerate(metrics, start=1):
      params = jax.tree.map(lambda a, s=step: a * s, model.params)
      mi = model.replace(variables={**model.variables, "params": params}, meta={**model.meta, "step": step})
      args = ocp.args.Composite(**checkpoint.save_args(mi),
                                opt_state=ocp.args.StandardSave({"mu": np.full(3, step, np.float32)}))
      mgr.save(step, args=args, metrics=m)
      saved.append(mi)
    mgr.wait_until_finished()
  return saved


def test_workdir_loads_the_best_step_by_recorded_metric(model: jaxft.Model, tmp_path: Path) -> None:
  saved = _train_workdir(tmp_path, model, [{"val_top1": 0.5}, {"val_top1": 0.8}, {"val_top1": 0.6}],
                         {"best_fn": lambda m: m["val_top1"], "best_mode": "max"})
  for p in (tmp_path, tmp_path / "checkpoints"):
    loaded = checkpoint.load_model(p)
    assert_same(loaded, saved[1])
    assert (loaded.meta["checkpoint_step"], loaded.meta["weights"]) == (2, "best")
    assert loaded.meta["checkpoint_why"] == "best step 2 by val_top1=0.8 (max)"
  assert_same(checkpoint.load_model(tmp_path / "checkpoints" / "3"), saved[2])  # a step dir itself
  assert checkpoint.best_step(tmp_path / "checkpoints", "val_top1", "min")[0] == 1


def test_workdir_best_metric_named_in_root_metadata(model: jaxft.Model, tmp_path: Path) -> None:
  saved = _train_workdir(tmp_path, model, [{"loss": 0.3, "top1": 0.1}, {"loss": 0.2, "top1": 0.05},
                                           {"loss": 0.4, "top1": 0.2}],
                         {"best_fn": lambda m: m["loss"], "best_mode": "min"},
                         metadata={"best_metric": "loss", "best_mode": "min"})
  assert checkpoint.best_step(tmp_path / "checkpoints") == (2, "best step 2 by loss=0.2 (min)")
  assert_same(checkpoint.load_model(tmp_path), saved[1])
  assert checkpoint.load_model(tmp_path, metric="top1").meta["step"] == 3


def test_workdir_without_metrics_loads_the_latest(model: jaxft.Model, tmp_path: Path) -> None:
  saved = _train_workdir(tmp_path, model, [None, None])
  assert checkpoint.best_step(tmp_path / "checkpoints") == (2, "latest step 2 (no best-metric recorded)")
  loaded = checkpoint.load_model(tmp_path)
  assert_same(loaded, saved[1])
  assert (loaded.meta["checkpoint_step"], loaded.meta["weights"]) == (2, "latest")


def test_load_meta_is_never_stored(model: jaxft.Model, tmp_path: Path) -> None:
  loaded = checkpoint.load_model(checkpoint.save_model(tmp_path / "a", model))
  record = checkpoint.model_record(loaded)
  assert not set(checkpoint.LOAD_META_KEYS) & set(record["meta"])


def test_train_manager_records_metrics_so_the_best_step_is_found_on_disk(tmp_path):
  # orbax writes a step's metrics only when the manager tracks a best step: without them every
  # workdir's "best" silently fell back to the latest step.
  mngr = checkpoint.train_manager(tmp_path, keep=3)
  item = {"w": np.zeros(2, np.float32)}
  for step, top1 in [(1, 0.2), (2, 0.9), (3, 0.5)]:
    args = {name: ocp.args.StandardSave(item) if name != checkpoint.MODEL_ITEM else ocp.args.JsonSave({})
            for name in checkpoint.TRAIN_ITEMS}
    mngr.save(step, args=ocp.args.Composite(**args), metrics={checkpoint.VAL_TOP1: top1}, force=True)
  mngr.close()
  assert checkpoint.best_step(tmp_path / checkpoint.CHECKPOINTS_SUBDIR)[0] == 2
