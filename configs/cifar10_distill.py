"""Compress, keep the knowledge: prune the real CIFAR ResNet-56 by a third of its FLOPs, then distil the
unpruned network into the pruned one.

    mkdir -p data && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C data
    python -m jaxft.train --config configs/cifar10_distill.py --workdir runs/cifar10_distill

The control — the same pruned model fine-tuned for the same steps without a teacher:

    python -m jaxft.train --config configs/cifar10_distill.py --workdir runs/cifar10_prune_only \\
        --config.distill.teacher= --config.loss.kd=0 --config.loss.ce=1

Surgery: ``prune_channels`` keeps the half of the inner channels (by L1 norm of conv1's filters) of every
block of layer2 and layer3 — block interfaces and shortcuts are unchanged, FLOPs at 32×32 fall by 31.8%
(229.7 M → 156.7 M, ``surgery.report``), parameters by 47%. The teacher ``'base'`` is the pretrained
ResNet-56 before surgery, run frozen in eval mode inside the same jitted step; the loss is
``0.1 · CE + 0.9 · T²·KL(teacher ‖ student)`` at ``T = 4`` (Hinton et al.'s α = 0.9). An EMA of the
weights (decay 0.99) is evaluated and checkpointed beside them. Validation: 10% of the train split.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  c = cifar10.get_config()
  c.model.arch = "cifar_resnet56"
  c.model.pretrained = "../shared/weights/cifar-resnet/resnet56-4bfd9763.th"
  c.model.num_classes = 10
  c.surgery = [{"op": "prune_channels", "blocks": "layer[23]/.*", "fraction": 0.5, "criterion": "l1"}]
  c.data.source = "folder:data/cifar10-jpeg/train"
  c.data.val_fraction = 0.1
  c.distill.teacher = "base"
  c.distill.temperature = 4.0
  c.loss.ce = 0.1
  c.loss.kd = 0.9
  c.ema.decay = 0.99
  c.optim.lr = 0.02
  c.optim.schedule.kind = "warmup_cosine"
  c.optim.schedule.warmup_steps = 20
  c.train.batch_size = 64
  c.train.num_steps = 200
  c.train.eval_every = 0  # at the end only: a validation pass costs ~a minute on 2 CPU cores
  c.train.eval_batch_size = 500
  c.train.checkpoint_every = 100
  c.train.log_every = 20
  c.train.progress = "log"
  return c
