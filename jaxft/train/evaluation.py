"""Validation during training: every head's metrics, for the raw and the averaged (EMA) weights."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from jaxft import data as data_lib
from jaxft import report
from jaxft.train.mesh import DataMesh
from jaxft.train.state import TrainState
from jaxft.train.tasks import Task

if TYPE_CHECKING:  # grain is imported only by runs that stream
  from jaxft.data import stream as stream_lib


def _local_chunks(images: np.ndarray, bs: int, mesh: DataMesh) -> Any:
  """This process's rows of each ``bs`` chunk of ``images``, the last chunk zero-padded."""
  for i in range(0, len(images), bs):
    chunk = images[i:i + bs]
    if len(chunk) < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    yield mesh.local_rows(chunk)


def eval_logits(eval_fn: Callable, variables: Any, images: np.ndarray | stream_lib.EvalSet,
                batch_size: int, mesh: DataMesh) -> dict[str, np.ndarray]:
  """Every head's logits for every image, by head name; the last batch is padded so one compiled
  shape serves all batches.

  ``images`` is an array every process holds whole, or an :class:`~jaxft.data.stream.EvalSet`, of
  which each process decodes (or takes) only its rows of each batch; the logits are gathered back to
  every process. Nothing passed in is mutated.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  bs = max(mesh.num_devices, batch_size - batch_size % mesh.num_devices)
  n = len(images)
  if isinstance(images, np.ndarray):
    chunks = _local_chunks(images, bs, mesh)
  else:
    chunks = images.local_batches(bs, mesh.process_index, mesh.process_count)
  out: dict[str, list[np.ndarray]] = {}
  for i, local in zip(range(0, n, bs), chunks):
    heads = multihost_utils.process_allgather(eval_fn(variables, mesh.shard_local(local)), tiled=True)
    for name, logits in heads.items():
      out.setdefault(name, []).append(np.asarray(logits)[:min(bs, n - i)])
  return {name: np.concatenate(v) for name, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Evaluates a train state on the validation set.

  Attributes:
    eval_fn: the jitted ``eval_step(variables, images) -> {head: logits}``.
    val_ds: the validation data: decoded images, or an :class:`~jaxft.data.stream.EvalSet`
      (held or streamed through the eval transform).
    tasks: the extra heads, scored against their mapped labels.
    batch_size: images per forward pass.
    mesh: where the batches go.
  """

  eval_fn: Callable
  val_ds: data_lib.Dataset | stream_lib.EvalSet
  tasks: tuple[Task, ...]
  batch_size: int
  mesh: DataMesh

  def _metrics(self, variables: Any) -> dict[str, Any]:
    ds = self.val_ds
    images = ds.images if isinstance(ds, data_lib.Dataset) else ds
    heads = eval_logits(self.eval_fn, variables, images, self.batch_size, self.mesh)
    out = report.classification_metrics(heads["head"], ds.labels, ds.class_names)
    per_task = {t.name: report.classification_metrics(heads[t.name], t.labels(ds.labels), t.classes)
                for t in self.tasks}
    if per_task:
      out["tasks"] = per_task
    return out

  def main_loss(self, state: TrainState) -> float:
    """The main head's mean cross-entropy with the raw weights (what the adaptive controller reads)."""
    return float(self._metrics(state.variables())["loss"])

  def __call__(self, state: TrainState) -> dict[str, Any]:
    """Main-head metrics (:func:`jaxft.report.classification_metrics`), plus ``tasks`` (per task
    head) and ``ema`` (the same for the averaged weights, when the state has them)."""
    val = self._metrics(state.variables())
    if state.ema is not None:
      val["ema"] = self._metrics(state.ema_variables())
    return val


def val_record(val: dict[str, Any]) -> dict[str, Any]:
  """The scalars written to metrics.jsonl: ``top1``, ``top1_<task>``, ``ema_top1``, ``ema_top1_<task>``…"""
  rec = {k: val[k] for k in ("loss", "top1", "top5")} | {"per_class": val["per_class"]}
  for prefix, v in (("", val), ("ema_", val.get("ema"))):
    if v is None:
      continue
    if prefix:
      rec.update({f"{prefix}{k}": v[k] for k in ("loss", "top1", "top5")})
    for name, m in v.get("tasks", {}).items():
      rec.update({f"{prefix}{k}_{name}": m[k] for k in ("loss", "top1")})
  return rec


def val_line(step: int, val: dict[str, Any]) -> str:
  """The log line of one validation pass."""
  tasks = "".join(f" | {n} top1 {m['top1']:.4f}" for n, m in val.get("tasks", {}).items())
  ema = f" | EMA top1 {val['ema']['top1']:.4f}" if "ema" in val else ""
  return (f"step {step}: val loss {val['loss']:.4f} top1 {val['top1']:.4f} top5 {val['top5']:.4f}"
          f"{tasks}{ema}")


def final_result(val: dict[str, Any]) -> dict[str, Any]:
  """The validation part of what ``train_and_evaluate`` returns: ``n``, ``loss``, ``top1``, ``top5``,
  ``per_class``, and ``tasks`` / ``ema`` summaries when present."""
  result = {k: val[k] for k in ("n", "loss", "top1", "top5", "per_class")}
  if "tasks" in val:
    result["tasks"] = {n: {k: m[k] for k in ("loss", "top1", "per_class")} for n, m in val["tasks"].items()}
  if "ema" in val:
    result["ema"] = {k: val["ema"][k] for k in ("loss", "top1", "top5")}
    result["ema"].update({f"top1_{n}": m["top1"] for n, m in val["ema"].get("tasks", {}).items()})
  return result
