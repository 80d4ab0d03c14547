"""The pure train and eval steps (jit them; the train step's state is donated).

One train step, in order: augment the uint8 batch on device (crop, flip, normalise), erase random boxes,
mix the batch with its reverse (mixup / cutmix) and mix every head's targets with the same ``lam``; run
the frozen teacher in eval mode; forward the student in train mode (dropout, batch statistics); sum the
weighted loss terms (:mod:`jaxft.train.objective`); take gradients of the trainable params only; apply
the optax chain; keep the new BN statistics; update the EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxft import adapt
from jaxft import ema as ema_lib
from jaxft import losses
from jaxft.data import transforms
from jaxft.train.objective import Objective, TeacherNet, loss_terms
from jaxft.train.state import TrainState

Array = jax.Array
REG_METRIC = "reg/"  # metrics ``reg/<config key>``: the adaptive weights in effect at the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static (hashable) parts of the train/eval step: augmentation, batch mixing and EMA."""

  crop_padding: int
  flip: bool
  out_size: int | None
  mean: tuple[float, ...]
  std: tuple[float, ...]
  label_smoothing: float
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  random_erasing: float = 0.0
  ema_decay: float = 0.0  # only read when the state carries an EMA
  ema_warmup: bool = True


def _inputs(key: Array, batch: dict[str, Array], sc: StepConfig, obj: Objective, num_classes: int
            ) -> tuple[Array, Array, dict[str, Array], dict[str, Array]]:
  """Returns ``(x, lam, labels, targets)``: the augmented, erased, mixed images, the mixing weight,
  the labels of every head (``head`` and each task's name) and their mixed target distributions."""
  aug_key, mix_key, erase_key = key
  x = transforms.augment(aug_key, batch["image"], crop_padding=sc.crop_padding, flip=sc.flip,
                       out_size=sc.out_size, mean=sc.mean, std=sc.std)
  labels = {"head": batch["label"]}
  labels.update({t.name: jnp.asarray(t.label_table, jnp.int32)[batch["label"]] for t in obj.tasks})
  # Random erasing per image (as timm), then mixup/cutmix of the batch with its reverse.
  x = transforms.random_erasing(erase_key, x, sc.random_erasing)
  x, lam = transforms.mix_batch(mix_key, x, mixup_alpha=sc.mixup_alpha, cutmix_alpha=sc.cutmix_alpha,
                                prob=sc.mix_prob, switch_prob=sc.mix_switch_prob)
  smooth = lambda y, n: transforms.mix_targets(losses.one_hot_targets(y, n, sc.label_smoothing), lam)
  targets = {"ce": smooth(labels["head"], num_classes)}
  targets.update({t.name: smooth(labels[t.name], t.num_classes) for t in obj.tasks})
  return x, lam, labels, targets


def _metrics(loss: Array, terms: dict[str, Array], out: dict[str, Any], t_out: dict[str, Any] | None,
             labels: dict[str, Array], lam: Array, norm: Callable[[Any], Array], grads: Any,
             params: Any, lr: Array) -> dict[str, Array]:
  # Under mixup/cutmix the right answer for an image is the label of whichever image dominates it.
  dominant = lambda y: jnp.where(lam >= 0.5, y, y[::-1])
  top1 = lambda logits, y: jnp.mean(jnp.argmax(logits, -1) == dominant(y))
  metrics = {"loss": loss, "top1": top1(out["logits"], labels["head"]), "grad_norm": norm(grads),
             "param_norm": norm(params), "lr": lr}
  metrics.update({f"loss_{k}": v for k, v in terms.items()})
  metrics.update({f"top1_{name}": top1(out["heads"][name], y) for name, y in labels.items()
                  if name != "head"})
  if t_out is not None:
    metrics["teacher_agreement"] = jnp.mean(
        jnp.argmax(out["logits"], -1) == jnp.argmax(t_out["logits"], -1))
  return metrics


def _reweighted(terms: dict[str, tuple[Any, Array]], reg: dict[str, Array]
                ) -> dict[str, tuple[Any, Array]]:
  """``terms`` with the weight of each term ``t`` that is adaptive (``reg['loss.t']``) read from the
  state (a new dict)."""
  return {k: (reg.get(adapt.LOSS_PREFIX + k, w), v) for k, (w, v) in terms.items()}


def _dropout_override(net: Any, reg: dict[str, Array]) -> dict[str, Any]:
  """``net.apply``'s ``head_dropout`` argument when ``model.dropout`` is adaptive (else nothing)."""
  if "model.dropout" not in reg:
    return {}
  return {"head_dropout": {net.spec.heads[0].name: reg["model.dropout"]}}


def make_train_step(net: Any, tx: optax.GradientTransformation, schedule: Callable[[Any], Any],
                    sc: StepConfig, seed: int, accumulate_steps: int = 1,
                    objective: Objective = Objective(), teacher: TeacherNet | None = None,
                    norm: Callable[[Any], Array] = optax.tree.norm, reference: TeacherNet | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
  """Returns the pure ``train_step(state, batch, teacher_variables=None, reference_inputs=None) ->
  (state, metrics)``.

  ``state`` is a :class:`~jaxft.train.state.TrainState`; gradients are taken with respect to its
  trainable ``params`` only; its EMA (when it has one) is updated after the optimizer. The rng of a step
  is ``fold_in(key(seed), step)`` — no rng state to checkpoint. ``batch`` is ``{'image': uint8 [N, H, W,
  3], 'label': int [N]}``. ``teacher_variables`` (never donated, never changed) are the teacher's when
  ``teacher`` is given; it runs in eval mode on the same augmented, mixed batch inside the same step.
  ``norm`` computes the norm metrics. ``reference`` is the pretrained model of the ``delta`` term (run
  like the teacher); ``reference_inputs`` (never donated, never changed) are then ``{'variables': its
  variables, 'attention': {stage: [C] channel weights}}``.

  Metrics: ``loss`` (the weighted sum), ``loss_<term>`` (each term unweighted), ``top1`` (and
  ``top1_<task>``) against the label of the image that dominates each mixed one, ``teacher_agreement``
  (share of the batch where student and teacher predict the same class), ``grad_norm``, ``param_norm``,
  ``lr``, and ``reg/<config key>`` for each adaptive weight (``state.reg``: the loss weights, the head
  dropout rate and the optimizer's ``reg`` extra argument read it, so a move never recompiles).
  """
  base_key = jax.random.key(seed)
  num_classes = net.spec.num_classes
  obj = objective
  if (obj.kd or obj.feature) and teacher is None:
    raise ValueError("the kd/feature terms need a teacher")
  if obj.delta and reference is None:
    raise ValueError("the delta term needs the pretrained reference network")

  def train_step(state: TrainState, batch: dict[str, Array],
                 teacher_variables: Any = None, reference_inputs: Any = None
                 ) -> tuple[TrainState, dict[str, Array]]:
    step_key = jax.random.fold_in(base_key, state.step)
    aug_key, drop_key = jax.random.split(step_key)
    mix_key, erase_key = jax.random.split(jax.random.fold_in(step_key, 1))
    x, lam, labels, targets = _inputs((aug_key, mix_key, erase_key), batch, sc, obj, num_classes)
    t_out = None if teacher is None else teacher.outputs(teacher_variables, x, sc.mean, sc.std)
    ref = None if reference is None else {
        "stages": reference.outputs(reference_inputs["variables"], x, sc.mean, sc.std)["stages"],
        "attention": reference_inputs["attention"]}

    def loss_fn(trainable: Any) -> tuple[Array, tuple[dict[str, Array], dict[str, Any], Any]]:
      variables = state.replace(params=trainable).variables()
      out, updates = net.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": drop_key}, return_all=True,
                               **_dropout_override(net, state.reg))
      terms = _reweighted(loss_terms(obj, out, targets, teacher, t_out, ref), state.reg)
      # A traced (adaptive) weight is always summed; a Python 0 turns its term off.
      total = sum(w * v for w, v in terms.values() if not isinstance(w, (int, float)) or w)
      return total, ({k: v for k, (_, v) in terms.items()}, out, updates["batch_stats"])

    (loss, (terms, out, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    optim_reg = {k: v for k, v in state.reg.items() if k.startswith("optim.")}
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   **({"reg": optim_reg} if optim_reg else {}))
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:  # the EMA of the weights (and BN statistics), after the update
      decay = ema_lib.ema_decay(state.step, sc.ema_decay, sc.ema_warmup)
      ema = optax.incremental_update(type(ema)(params=params, batch_stats=batch_stats), ema, 1.0 - decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats, ema=ema)
    lr = schedule(state.step // accumulate_steps)  # the schedule counts optimizer steps
    metrics = _metrics(loss, terms, out, t_out, labels, lam, norm, grads, params, lr)
    metrics.update({f"{REG_METRIC}{k}": v for k, v in state.reg.items()})  # the values in effect
    return new_state, metrics

  return train_step


def make_eval_step(net: Any, sc: StepConfig) -> Callable[[dict[str, Any], Array], dict[str, Array]]:
  """Returns ``eval_step(variables, images_uint8) -> {head name: logits}`` (eval-mode BN, no
  augmentation). ``variables`` are ``TrainState.variables()`` (or ``ema_variables()``)."""

  def eval_step(variables: dict[str, Any], images: Array) -> dict[str, Array]:
    x = transforms.preprocess_eval(images, sc.mean, sc.std, out_size=sc.out_size)
    return net.apply(variables, x, train=False, return_all=True)["heads"]

  return eval_step
