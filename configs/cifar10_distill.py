"""Compress, keep the knowledge: prune the real CIFAR ResNet-56 by a third of its FLOPs, then distil the
unpruned network into the pruned one.

    mkdir -p data && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C data
    # 1. the teacher: the unpruned ResNet-56 fine-tuned on this data (no surgery, no teacher)
    python -m jaxft.train --config configs/cifar10_distill.py:teacher --workdir runs/cifar10_teacher
    # 2. the student: the pruned model distilled from it
    python -m jaxft.train --config configs/cifar10_distill.py --workdir runs/cifar10_distill
    # controls: the pruned model without a teacher; distilling from the pretrained model as is
    python -m jaxft.train --config configs/cifar10_distill.py:control --workdir runs/cifar10_prune_only
    python -m jaxft.train --config configs/cifar10_distill.py:base --workdir runs/cifar10_distill_base

Surgery: ``prune_channels`` keeps the half of the inner channels (by L1 norm of conv1's filters) of every
block of layer2 and layer3 — block interfaces and shortcuts are unchanged, FLOPs at 32×32 fall by 31.8%
(229.7 M → 156.7 M, ``surgery.report``), parameters by 47%. The teacher (a training workdir, or
``'base'``: the pretrained ResNet-56 before surgery) runs frozen in eval mode inside the same jitted
step; the loss is ``0.1 · CE + 0.9 · T²·KL(teacher ‖ student)`` at ``T = 4`` (Hinton et al.'s
α = 0.9). An EMA of the weights (decay 0.99) is evaluated and checkpointed beside them. Validation:
10% of the train split, carved out by seed (the pretrained ResNet-56 saw these images in its original
training, so absolute accuracies are optimistic; the runs compare with each other fairly).
"""

import ml_collections

from configs import cifar10


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """``variant`` (after ``:`` in ``--config``): '' distils from ``runs/cifar10_teacher``; ``base``
  distils from the pretrained model as is; ``control`` trains the pruned model without a teacher;
  ``teacher`` fine-tunes the unpruned model (no surgery, no teacher) into ``runs/cifar10_teacher``."""
  if variant not in ("", "base", "control", "teacher"):
    raise ValueError(f"unknown variant {variant!r}; valid: '', base, control, teacher")
  c = cifar10.get_config()
  c.model.arch = "cifar_resnet56"
  c.model.pretrained = "../shared/weights/cifar-resnet/resnet56-4bfd9763.th"
  c.surgery = [{"op": "prune_channels", "blocks": "layer[23]/.*", "fraction": 0.5, "criterion": "l1"}]
  c.data.source = "folder:data/cifar10-jpeg/train"
  c.distill.teacher = "runs/cifar10_teacher"
  c.loss.ce = 0.1
  c.loss.kd = 0.9
  c.ema.decay = 0.99
  c.optim.lr = 0.02
  c.optim.schedule.kind = "warmup_cosine"
  c.optim.schedule.warmup_steps = 20
  c.train.batch_size = 64
  c.train.num_steps = 200
  c.train.eval_every = 0  # at the end only: a validation pass costs ~a minute on 2 CPU cores
  c.train.checkpoint_every = 100
  c.train.log_every = 20
  c.train.progress = "log"
  if variant == "base":
    c.distill.teacher = "base"
  elif variant in ("control", "teacher"):
    c.distill.teacher = ""
    c.loss.ce, c.loss.kd = 1.0, 0.0
    if variant == "teacher":
      c.surgery = []
  return c
