"""Offline main job: evolve the real pretrained CIFAR ResNet-56 and fine-tune it on real CIFAR-10 JPEGs.

    mkdir -p data && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C data
    python -m jaxft.train --config configs/cifar10_resnet56.py --workdir runs/cifar10_resnet56

Surgery (recorded in the checkpoint's evolution log): a fresh 10-class head, residual adapters grafted
function-preservingly after every block of the last stage, then stem + layer1 frozen (their BatchNorm
statistics too), layer2 at 0.1× and the head at 10× the learning rate, L2-SP pulling the pretrained
kernels toward their starting values. Validation is 10% of the train split, carved out by seed.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  c = cifar10.get_config()
  c.model.arch = "cifar_resnet56"
  c.model.pretrained = "../shared/weights/cifar-resnet/resnet56-4bfd9763.th"
  c.surgery = [
      {"op": "replace_head", "num_classes": 10, "seed": 0},
      {"op": "add_adapters", "blocks": "layer3/.*", "width": 16},
  ]
  c.data.source = "folder:data/cifar10-jpeg/train"
  c.optim.lr = 0.01
  c.optim.lr_rules = (("(stem|layer1)/.*", "frozen"), ("layer2/.*", 0.1), ("head/.*", 10.0))
  c.optim.l2sp.alpha = 0.01
  c.optim.schedule.kind = "warmup_cosine"
  c.optim.schedule.warmup_steps = 20
  c.train.batch_size = 100
  c.train.num_steps = 100
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.log_every = 20
  return c
