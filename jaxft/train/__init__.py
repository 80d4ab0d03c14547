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

from jaxft import _lazy

# Lazy (PEP 562): `python -m jaxft.train` imports this package first, and its CLI must reach
# jaxft.cpu.enable() — which may re-exec the process under tcmalloc — before jax is imported.
__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "load_ema_model": "jaxft.checkpoint", "TrainError": ".errors", "train_and_evaluate": ".loop",
    "Objective": ".objective", "TeacherNet": ".objective",
    "build_model": ".setup", "build_objective": ".setup", "load_base_model": ".setup",
    "load_teacher": ".setup", "new_leaf_mask": ".setup",
    "Ema": ".state", "TrainState": ".state",
    "StepConfig": ".steps", "make_eval_step": ".steps", "make_train_step": ".steps",
    "Task": ".tasks", "build_tasks": ".tasks",
}, ("cli", "errors", "evaluation", "loop", "mesh", "monitor", "objective", "progress", "setup", "state",
    "steps", "tasks", "workdir"))
