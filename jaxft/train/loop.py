"""The loop: ``train_and_evaluate(config, workdir)``, which tests call and the CLI wraps.

Rerunning with the same workdir resumes from the newest intact checkpoint, exactly: the data order and
every random number are functions of (seed, step), so k steps + resume + k steps equals 2k steps. One
process at a time runs in a workdir (``workdir.WorkdirLock``); a rerun must use the workdir's config and
data unless allowed (``train.allow_config_change`` / ``train.allow_data_change``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxft import checkpoint as ckpt_lib
from jaxft import cpu
from jaxft import data as data_lib
from jaxft import adapt, models, report, surgery
from jaxft.models.model import Model
from jaxft.train import controller, evaluation, setup
from jaxft.train import delta as delta_lib
from jaxft.train import workdir as workdir_lib
from jaxft.train.errors import EXIT_BAD_INPUT, EXIT_DAMAGED_CHECKPOINT, TrainError, check_config
from jaxft.train.mesh import DataMesh
from jaxft.train.monitor import TrainMonitor
from jaxft.train.progress import Progress, StopFlag
from jaxft.train.state import TrainState
from jaxft.train.steps import make_eval_step, make_train_step


def _start(mngr: ocp.CheckpointManager, fresh: TrainState, workdir: Path, mesh: DataMesh) -> TrainState:
  """Resume this workdir's newest intact checkpoint (damaged newer ones are reported and set aside),
  else ``fresh``; on the devices.

  Raises:
    TrainError: no intact checkpoint (exit code 4), or one that does not fit this config (2).
  """
  try:
    state, step = ckpt_lib.resume_train_state(mngr, fresh)
  except ckpt_lib.DamagedCheckpointError as e:
    raise TrainError(str(e), exit_code=EXIT_DAMAGED_CHECKPOINT) from None
  except ckpt_lib.CheckpointError as e:
    raise TrainError(str(e), exit_code=EXIT_BAD_INPUT) from None
  if step is not None:
    logging.info("resuming %s from step %d", workdir, step)
  return mesh.replicate(state)


def _finish(workdir: Path, result: dict[str, Any], val: dict[str, Any] | None,
            val_ds: data_lib.Dataset | None) -> None:
  """Writes the confusion matrix, ``final_metrics.json`` (with a validation result) and the curves."""
  if jax.process_index() != 0:
    return
  if val is not None:
    report.plot_confusion(val["confusion"], val_ds.class_names, workdir / "confusion_matrix.png")
    (workdir / "final_metrics.json").write_text(json.dumps(report.json_ready(result), indent=2,
                                                           allow_nan=False))
  report.plot_curves(report.read_metrics(workdir), workdir / "curves.png")


def _prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> Path:
  """Validates ``config`` before anything is created or loaded, then makes the workdir (absolute: orbax
  refuses relative checkpoint paths) and, for multi-host runs, starts ``jax.distributed``."""
  check_config(config)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if config.distributed:
    jax.distributed.initialize()
  return workdir


def _log_devices(mesh: DataMesh) -> None:
  """Logs the devices, and on CPU which backend kernels and allocator run."""
  logging.info("%d × %s device(s)", mesh.num_devices, jax.devices()[0].device_kind)
  if jax.devices()[0].platform == "cpu":
    logging.info("CPU backend: %s", cpu.status())


def _surgery_report(base: Model, model: Model) -> Any:
  """The surgery report of ``base`` → ``model`` (logged), or None when the structure is unchanged."""
  if model.spec == base.spec:
    return None
  rep = surgery.report(base, model, model.meta["input_size"])
  logging.info("surgery (base → model):\n%s", rep)
  return rep


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
                       on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> dict:
  """Fine-tunes per ``config`` (never mutated), writing checkpoints, metrics and plots to ``workdir``.

  ``on_eval(step, val)``, when given, is called after each validation pass (``val`` as in the result
  below); it stops the run by raising (a hyperparameter search prunes a weak trial this way,
  :mod:`jaxft.sweep`): the exception propagates, the checkpoints saved so far are kept.

  The workdir is locked for the whole run (a second process on it is refused); ``config.json`` and
  ``data.json`` are written once the run has really started (see :mod:`jaxft.train.workdir`).

  Returns:
    The final validation metrics (``top1``, ``top5``, ``loss``, ``per_class``, ``n``; ``tasks`` and
    ``ema`` when on) plus ``step``, ``interrupted`` (True when a signal stopped the run early after
    saving) and ``surgery`` (the surgery report, when the model's structure changed).

  Raises:
    TrainError: with ``exit_code`` 2 for bad weights/data/workdir/config, 3 for a non-finite loss or
      state (the last good checkpoint is kept and named), 4 when no checkpoint of the workdir is
      intact, 5 when another process runs in the workdir.
  """
  workdir = _prepare(config, workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _locked_train_and_evaluate(config, workdir, on_eval)


def _locked_train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path,
                               on_eval: Callable[[int, dict[str, Any]], None] | None) -> dict:
  """:func:`train_and_evaluate` once this process holds the workdir."""
  resuming = bool(ckpt_lib.saved_steps(workdir))
  config_changes = workdir_lib.check_workdir_config(workdir, config, resuming)
  written = config  # what config.json records; the run is built with each adaptive weight's start
  specs = adapt.specs(config)
  config = adapt.start_config(config)

  # --- Data: decoded once (cached on disk), validation carved from train unless given. ---
  train_ds, val_ds = setup.load_data(config)
  identity = workdir_lib.data_identity(train_ds, val_ds)
  data_changes = workdir_lib.check_workdir_data(workdir, written, identity, resuming)
  total_steps = setup.total_steps(config, len(train_ds))

  # --- Model: pretrained → else init; then the config's surgery; the data's classes in its meta. ---
  base, model = setup.build_model(config, jax.random.key(config.seed))
  model, tasks = setup.fit_to_data(config, model, train_ds)
  surgery_report = _surgery_report(base, model)

  # --- Objective (named loss terms, the frozen teacher); optimizer over the trainable subtree. ---
  objective, teacher_net, teacher_variables = setup.build_objective(config, base, model, tasks)
  setup.check_bss(config, model)
  reference_net, delta_stages = setup.build_reference(config, base, model)
  opt = setup.build_optimizer(config, base, model, total_steps, adaptive=tuple(specs))
  net = models.Network(model.spec, dtype=setup.compute_dtype(config), frozen_bn=tuple(opt.frozen_bn),
                       layers=cpu.network_layers())
  sc = setup.step_config(config, model)

  # --- Devices and the starting state: resume this workdir, else step 0. The run has started. ---
  mesh = DataMesh.create(config.train.batch_size)
  _log_devices(mesh)
  trainable, frozen = opt.split(model.params)
  fresh = TrainState.create(trainable, frozen, model.batch_stats, opt.tx.init(trainable),
                            ema=bool(config.ema.decay), reg=adapt.initial(specs))
  mngr = ckpt_lib.train_manager(workdir, config.train.keep_checkpoints)
  state = _start(mngr, fresh, workdir, mesh)
  workdir_lib.record_start(workdir, written, identity, int(state.step), config_changes, data_changes)

  # --- The compiled steps. ---
  train_step = jax.jit(_train_step(config, net, opt, sc, objective, teacher_net, reference_net),
                       donate_argnums=(0,))
  if teacher_variables is not None:
    # Copied: a 'base' teacher shares arrays with the student's (donated) state.
    teacher_variables = mesh.replicate(teacher_variables, copy=True)
  saved = {} if reference_net is None else {
      ckpt_lib.DELTA_ITEM: _delta_attention(config, mngr, int(state.step), base, reference_net,
                                            delta_stages, train_ds)}
  reference = None if reference_net is None else mesh.replicate(
      {"variables": {"params": base.params, "batch_stats": base.batch_stats},
       "attention": saved[ckpt_lib.DELTA_ITEM]}, copy=True)
  eval_fn = jax.jit(make_eval_step(net, sc))
  evaluate = None if val_ds is None else evaluation.Evaluator(
      eval_fn, val_ds, tasks, config.train.eval_batch_size, mesh)
  adapter = controller.build_controller(config, specs, eval_fn, train_ds, val_ds, mesh)
  run = _Run(train_step, teacher_variables, mesh, None, evaluate, None, mngr, model, total_steps,
             config.train.eval_every, config.train.checkpoint_every, reference, saved, adapter,
             on_eval)
  try:
    result, val = _run_steps(config, workdir, run, state, train_ds)
  finally:
    mngr.close()
  if surgery_report is not None:
    result["surgery"] = surgery_report.to_dict()
  _finish(workdir, result, val, val_ds)
  return result


def _run_steps(config: ml_collections.ConfigDict, workdir: Path, run: "_Run", state: TrainState,
               train_ds: data_lib.Dataset) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Trains from ``state`` to the end (or a signal), then validates. Returns the result (``step``,
  ``interrupted`` and the final validation metrics) and the final validation (None when interrupted
  or without a validation set)."""
  start = int(state.step)
  writer = report.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if start and (dropped := writer.drop_after(start)):
    logging.info("metrics.jsonl: %d records after step %d dropped (this run writes them again)",
                 dropped, start)
  progress = Progress(start, run.total_steps, config.train.progress, config.train.log_every)
  monitor = TrainMonitor(writer, progress, batch_size=config.train.batch_size,
                         total_steps=run.total_steps, log_every=config.train.log_every,
                         checkpoint_dir=workdir / ckpt_lib.CHECKPOINTS_SUBDIR,
                         last_good=run.mngr.latest_step())
  batches = setup.train_batches(config, train_ds, start, run.total_steps - start)
  run = dataclasses.replace(run, monitor=monitor, writer=writer)
  try:
    state, val, interrupted = _train(run, state, batches)
  finally:
    progress.close()
    batches.close()
    writer.close()

  # --- Final evaluation. ---
  result: dict[str, Any] = {"step": int(state.step), "interrupted": interrupted}
  if run.evaluate is None or interrupted:
    return result, None
  val = val if val is not None else run.evaluate(state)
  result.update(evaluation.final_result(val))
  return result, val


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the step loop needs besides the state and the batches (built once by train_and_evaluate)."""

  train_step: Callable[..., Any]
  teacher_variables: Any
  mesh: DataMesh
  monitor: TrainMonitor | None  # set by _run_steps
  evaluate: evaluation.Evaluator | None
  writer: report.MetricWriter | None  # set by _run_steps
  mngr: ocp.CheckpointManager
  model: Model
  total_steps: int
  eval_every: int
  ckpt_every: int
  reference: Any = None  # the delta term's {'variables', 'attention'} on the devices, or None
  saved: dict[str, Any] = dataclasses.field(default_factory=dict)  # more checkpoint items by name
  controller: controller.Controller | None = None  # moves the adaptive weights at each evaluation
  on_eval: Callable[[int, dict[str, Any]], None] | None = None  # train_and_evaluate's hook


def _train(run: _Run, state: TrainState, batches: Any) -> tuple[TrainState, dict[str, Any] | None, bool]:
  """Runs the steps: validates and checkpoints every N steps and at the end, stops (after saving) on
  SIGTERM/SIGINT. Returns the last state, the last validation result (None if the last step had none)
  and whether a signal stopped the run."""
  val, interrupted = None, False
  with StopFlag() as stop:
    for s, images, labels in _timed(batches, run.monitor):
      # This host's rows only (setup.train_batches): the global batch is every host's rows together.
      batch = {"image": run.mesh.shard_local(images), "label": run.mesh.shard_local(labels)}
      state, metrics = run.train_step(state, batch, run.teacher_variables, run.reference)
      step = s + 1
      run.monitor.dispatched(step, metrics)
      is_last = step == run.total_steps
      val = None
      if run.evaluate is not None and ((run.eval_every and step % run.eval_every == 0) or is_last):
        val = run.evaluate(state)
        record = evaluation.val_record(val)
        logging.info("%s", evaluation.val_line(step, val))
        run.monitor.check_val(step, val)
        if run.controller is not None:  # before the checkpoint, which then holds the moved weights
          state, moved = run.controller(state, val)
          record.update(moved)
        run.writer.write(step, "val", record)
        if run.on_eval is not None:
          run.on_eval(step, val)
      if (run.ckpt_every and step % run.ckpt_every == 0) or is_last or stop.signal is not None:
        # Checked (never checkpoint a non-finite state) and written first, so that a kill after the
        # checkpoint loses no record of the steps it holds.
        run.monitor.flush()
        _save(run, state, step, val)
      if stop.signal is not None:
        logging.warning("received signal %d at step %d: checkpoint saved; rerun the same command "
                        "to resume", stop.signal, step)
        interrupted = True
        break
    run.monitor.flush()
  return state, val, interrupted


def _train_step(config: ml_collections.ConfigDict, net: Any, opt: Any, sc: Any, objective: Any,
                teacher_net: Any, reference_net: Any = None) -> Callable[..., Any]:
  """The pure train step of this run, with the CPU backend's norms where it is on."""
  return make_train_step(net, opt.tx, opt.schedule, sc, config.seed, config.optim.accumulate_steps,
                         objective, teacher_net, norm=cpu.norm_functions().global_norm,
                         reference=reference_net)


def _delta_attention(config: ml_collections.ConfigDict, mngr: ocp.CheckpointManager, step: int,
                     base: Model, reference_net: Any, stages: tuple[str, ...],
                     train_ds: data_lib.Dataset) -> dict[str, Any]:
  """DELTA's channel attention: read from the checkpoint a resumed run starts from (so that resuming is
  exact whatever the data now holds), else computed on the training data.

  Raises:
    TrainError: the checkpoint's attention is damaged or does not fit (exit code 4 / 2).
  """
  if step:
    shapes = delta_lib.stage_shapes(base.spec, 32)  # only the widths are read
    template = {name: np.zeros((shapes[name][-1],), np.float32) for name in stages}
    try:
      attention = ckpt_lib.restore_train_item(mngr, step, ckpt_lib.DELTA_ITEM, template)
    except ckpt_lib.DamagedCheckpointError as e:
      raise TrainError(str(e), exit_code=EXIT_DAMAGED_CHECKPOINT) from None
    except ckpt_lib.CheckpointError as e:
      raise TrainError(str(e), exit_code=EXIT_BAD_INPUT) from None
    if attention is not None:
      logging.info("DELTA attention read from the checkpoint of step %d", step)
      return attention
    logging.info("the checkpoint of step %d has no DELTA attention: computing it", step)
  return setup.delta_attention(config, base, reference_net, stages, train_ds)


def _save(run: _Run, state: TrainState, step: int, val: dict[str, Any] | None) -> None:
  """Checkpoints ``state`` (a non-finite one is refused: the NaN stop, naming the last good step)."""
  try:
    ckpt_lib.save_train_state(run.mngr, state, run.model, val["top1"] if val else None, run.saved)
  except ckpt_lib.NonFiniteStateError as e:
    raise run.monitor.stop(step, f"the train state became non-finite ({e.leaf})") from None
  run.monitor.saved(step)


def _timed(batches: Any, monitor: TrainMonitor) -> Any:
  """``batches``, telling ``monitor`` how long each one took to arrive."""
  while True:
    t0 = time.time()
    try:
      item = next(batches)
    except StopIteration:
      return
    monitor.waited(time.time() - t0)
    yield item
