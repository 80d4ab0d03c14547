"""Multi-task fine-tuning: the real CIFAR ResNet-56 keeps its 10-way head and grows a coarse 2-way
vehicle/animal head, trained together on the same batches.

    mkdir -p data && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C data
    python -m jaxft.train --config configs/multitask.py --workdir runs/multitask

The coarse head ``head_coarse`` is grafted by ``surgery.add_head`` (recorded in the evolution log) and
trained on labels mapped from the CIFAR-10 class of each image (``tasks[0].label_map``), so every batch
carries labels for both tasks: the batches of the two tasks are the same batches. The loss is
``CE(head) + 0.5 · CE(head_coarse)``; validation reports top-1 per head (``top1``, ``top1_coarse``)
for the raw and the EMA weights. Regularisers shown here: label smoothing 0.1 (both heads), dropout 0.1
before the main head, mixup (α = 0.2, every batch; both heads' targets mixed with the same λ), and an
EMA of the weights (decay 0.99).
"""

import ml_collections

from configs import cifar10

VEHICLES = ("airplane", "automobile", "ship", "truck")
ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")


def get_config() -> ml_collections.ConfigDict:
  c = cifar10.get_config()
  c.model.arch = "cifar_resnet56"
  c.model.pretrained = "../shared/weights/cifar-resnet/resnet56-4bfd9763.th"
  c.model.dropout = 0.1
  c.tasks = ({"name": "coarse", "classes": ("animal", "vehicle"),
              "label_map": {**{k: "vehicle" for k in VEHICLES}, **{k: "animal" for k in ANIMALS}},
              "weight": 0.5, "dropout": 0.0},)
  c.data.source = "folder:data/cifar10-jpeg/train"
  c.train.label_smoothing = 0.1
  c.mix.mixup_alpha = 0.2
  c.ema.decay = 0.99
  c.optim.lr = 0.01
  c.optim.lr_rules = (("head_coarse/.*", 10.0),)  # the new head starts from scratch
  c.optim.schedule.kind = "warmup_cosine"
  c.optim.schedule.warmup_steps = 20
  c.train.batch_size = 64
  c.train.num_steps = 200
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 20
  c.train.progress = "log"
  return c
