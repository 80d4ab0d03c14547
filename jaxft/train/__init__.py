"""The main job: fine-tune a (surgically evolved) pretrained model.

    python -m jaxft.train --config configs/cifar10.py --workdir runs/cifar10 [--config.a.b=value …]

:func:`train_and_evaluate` (``config, workdir``) does all the work and is what tests call; the CLI only
parses flags. Rerunning with the same workdir resumes from the latest checkpoint, exactly.

Fine-tuning techniques, all set in the config (see :mod:`jaxft.config`): the loss is a weighted sum of
named terms (``config.loss``; each logged as ``loss_<term>``) — cross-entropy of the main head and of
extra task heads (``config.tasks``), knowledge distillation from a frozen teacher run in eval mode inside
the same jitted step (``config.distill``); an EMA of the weights (``config.ema``) evaluated and
checkpointed beside them (item ``ema``, :func:`load_ema_model`); mixup / cutmix (``config.mix``), random
erasing, label smoothing and dropout before the head, on device.

Modules: ``state`` (the typed :class:`TrainState`), ``steps`` (the pure train / eval steps),
``objective`` (loss terms, the teacher), ``tasks`` (extra heads), ``setup`` (everything built from the
config), ``loop`` (:func:`train_and_evaluate`), ``mesh`` (devices), ``evaluation`` (validation),
``monitor`` / ``progress`` (metrics, progress, signals), ``workdir`` (config.json), ``cli`` (flags).
"""

from jaxft.checkpoint import load_ema_model
from jaxft.train.errors import TrainError
from jaxft.train.loop import train_and_evaluate
from jaxft.train.objective import Objective, TeacherNet
from jaxft.train.setup import build_model, build_objective, load_base_model, load_teacher, new_leaf_mask
from jaxft.train.state import Ema, TrainState
from jaxft.train.steps import StepConfig, make_eval_step, make_train_step
from jaxft.train.tasks import Task, build_tasks

__all__ = ["Ema", "Objective", "StepConfig", "Task", "TeacherNet", "TrainError", "TrainState",
           "build_model", "build_objective", "build_tasks", "load_base_model", "load_ema_model",
           "load_teacher", "make_eval_step", "make_train_step", "new_leaf_mask", "train_and_evaluate"]
