"""Fine-tune torchvision's ImageNet ResNet-50 on CIFAR-10 with the seed's recipe.

    python -m jaxft.train --config configs/cifar10.py --workdir runs/cifar10

Online, the weights come from torchvision and the data from TFDS. Offline, convert a local file and use a
local copy of CIFAR-10 instead:

    python tools/convert_torch_weights.py resnet50-0676ba61.pth weights/resnet50 --arch resnet50
    python -m jaxft.train --config configs/cifar10.py \\
        --config.model.pretrained=weights/resnet50 --config.data.source=cifar:cifar-10-python.tar.gz

Any field can be overridden with ``--config.a.b=value``; unknown keys are errors.
"""

import ml_collections

from jaxft import optim


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config; variants import it and override a few fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.distributed = False  # jax.distributed.initialize() for multi-host runs

  c.model = ml_collections.ConfigDict()
  c.model.arch = "resnet50"
  # '' = random init; a converted checkpoint dir; a .pth/.th/.safetensors file (converted on the fly
  # with model.arch); or 'torchvision:resnet50[.IMAGENET1K_V2]' (downloaded, needs network).
  c.model.pretrained = "torchvision:resnet50"
  c.model.num_classes = 10  # the pretrained head is replaced when this differs
  c.model.dtype = "float32"  # or "bfloat16" (compute only; parameters stay float32)
  c.model.input_size = 0  # resize images on device to this size; 0 = keep the data's size
  c.model.bn_momentum = 0.0  # BN running-average momentum (flax convention, e.g. 0.9); 0 = the model's
  c.model.dropout = 0.0  # dropout before the main head (surgery.set_dropout); 0 = as the model has it

  # Surgery ops applied after loading, in order, each recorded in the evolution log, e.g.
  # {"op": "add_adapters", "blocks": "layer[34]/.*", "width": 16}. See jaxft.surgery.apply_ops.
  c.surgery = []

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:cifar10"  # or folder:PATH, cifar:PATH (the CIFAR-10 python archive)
  c.data.val_source = ""  # '' = carve val_fraction of the training data out as validation
  c.data.val_split = "test"
  c.data.val_fraction = 0.1
  c.data.split_seed = 0
  c.data.limit = 0  # 0 = all images
  c.data.image_size = 0  # resize at decode time (folders of mixed sizes); 0 = keep
  c.data.crop_padding = 4  # random crop with this zero padding; 0 = no crop
  c.data.flip = True
  c.data.skip_corrupt = False
  c.data.random_erasing = 0.0  # per-image probability of erasing a random box (after normalising)
  c.data.cache_dir = ""  # '' = $JAXFT_CACHE_DIR or ~/.cache/jaxft

  c.optim = optim.seed_recipe()

  # The loss is a weighted sum of named terms, each logged as train/loss_<term> (unweighted):
  # ce (main head), kd (T²·KL to the teacher's softened logits), feature (pooled-feature
  # distillation), and task_<name> for each entry of c.tasks (its own weight). 0 = term off.
  c.loss = ml_collections.ConfigDict()
  c.loss.ce = 1.0
  c.loss.kd = 0.0
  c.loss.feature = 0.0

  c.distill = ml_collections.ConfigDict()
  # '' = none; 'base' = the pretrained model before surgery; a jaxft checkpoint dir or training
  # workdir; or a .pth/.th/.safetensors file (converted with distill.arch, default model.arch).
  c.distill.teacher = ""
  c.distill.arch = ""
  c.distill.temperature = 4.0
  c.distill.feature_mode = "auto"  # auto (mse if widths agree, else similarity) | mse | project | similarity

  # Multi-task heads, each trained on labels mapped from the main classes, e.g.
  # {"name": "coarse", "classes": ("animal", "vehicle"), "label_map": {"cat": "animal", …},
  #  "weight": 0.5, "dropout": 0.0}; the head head_<name> is grafted by surgery.add_head if missing.
  c.tasks = ()

  c.mix = ml_collections.ConfigDict()
  c.mix.mixup_alpha = 0.0  # 0 = off
  c.mix.cutmix_alpha = 0.0  # 0 = off
  c.mix.prob = 1.0  # probability that a batch is mixed at all
  c.mix.switch_prob = 0.5  # probability of cutmix when both are on

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0  # EMA of the weights, evaluated and checkpointed (item 'ema') beside them; 0 = off
  c.ema.warmup = True  # decay min(decay, (1 + step) / (10 + step)) early on

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 100
  c.train.epochs = 10
  c.train.num_steps = 0  # > 0 overrides epochs
  c.train.label_smoothing = 0.0
  c.train.eval_every = 500  # 0 = only at the end
  c.train.eval_batch_size = 500
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2  # the last K, plus the best by validation top-1
  c.train.log_every = 50
  c.train.progress = "auto"  # auto (bar on a TTY) | bar | log
  c.train.allow_config_change = False
  return c
