"""A tiny smoke variant for tests: CIFAR ResNet-8 from random init, a few steps on a small folder.

    python -m jaxft.train --config configs/tiny.py --config.data.source=folder:PATH --workdir /tmp/tiny
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  c = cifar10.get_config()
  c.model.arch = "cifar_resnet8"
  c.model.pretrained = ""
  c.model.num_classes = 2
  c.data.source = "folder:data/tiny"
  c.data.val_fraction = 0.25
  c.train.batch_size = 4
  c.train.num_steps = 4
  c.train.eval_every = 2
  c.train.eval_batch_size = 8
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.progress = "log"
  return c
