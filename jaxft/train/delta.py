"""DELTA's channel attention (Li et al., ICLR 2019), computed once before training.

DELTA keeps chosen stage feature maps of the fine-tuned network close to the pretrained model's, each
channel weighted by how much the pretrained model needs it *on the target data*: the increase of the
target loss when that channel is zeroed, normalised over the stage's channels by a softmax. Here:

* **the classifier** that defines "the target loss" is a linear probe (softmax regression) fitted on the
  pretrained model's frozen pooled features of the same images (:func:`fit_probe`): the pretrained head
  predicts the source classes and a head replaced by surgery is random, so neither measures what a
  channel is worth for the target task. The probe starts at zero and takes a fixed number of full-batch
  L-BFGS steps (``optax.lbfgs``), so it is a function of the images only;
* **the images** are the first ``loss.delta_batches`` training batches of the run's order
  (``data.batch_indices(seed, step)``), without augmentation: the attention is a function of
  ``(seed, data)``;
* **zeroing a channel** re-runs only the network after that stage (:func:`loss_increase`): a flax
  method interceptor hands every stage up to the zeroed one its stored output, so the stem is the only
  part recomputed;
* the attention of a stage is ``softmax(increase / loss.delta_temperature)`` (:func:`attention`).

The result is stored in the training checkpoint (``checkpoint.DELTA_ITEM``) so that a resumed run reads
it instead of recomputing it. Stages are compared by name and output shape (:func:`shared_stages`), so
DELTA works after surgery on the stages both models still have. Nothing here mutates its inputs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.models.network import Network, Stage
from jaxft.models.spec import ModelSpec

Array = jax.Array
Probe = tuple[Array, Array]  # (kernel [D, C], bias [C])

PROBE_STEPS = 100  # L-BFGS iterations of the linear probe (converged on every net we tried)
PROBE_L2 = 1e-3  # ridge penalty of the probe: keeps its optimum finite on separable features
CHANNEL_CHUNK = 64  # zeroed channels run side by side (bounds memory on wide stages)


def stage_shapes(spec: ModelSpec, input_size: int) -> dict[str, tuple[int, ...]]:
  """``{stage name: (H, W, C)}`` (a new dict) of each stage's output for ``input_size``² inputs, in
  network order (traced only, once per spec and size)."""
  return dict(_stage_shapes(spec, input_size))


@functools.lru_cache(maxsize=32)
def _stage_shapes(spec: ModelSpec, input_size: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
  net = Network(spec)
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  out = jax.eval_shape(lambda x: net.init_with_output(jax.random.key(0), x, return_all=True)[0], x)
  # In network order (eval_shape's pytree round trip sorts dict keys).
  return tuple((st.name, tuple(out["stages"][st.name].shape[1:])) for st in spec.stages)


def shared_stages(base: ModelSpec, model: ModelSpec, input_size: int,
                  wanted: Sequence[str] = ()) -> tuple[str, ...]:
  """The stages DELTA regularizes: ``wanted`` (all shared stages when empty), in network order.

  A stage is shared when both specs have a stage of that name with the same output shape.

  Raises:
    ValueError: a wanted stage that neither model has, or that surgery changed; no shared stage at all.
  """
  b, m = stage_shapes(base, input_size), stage_shapes(model, input_size)
  shared = tuple(n for n in m if b.get(n) == m[n])
  listing = ", ".join(shared) or "none"
  for name in wanted:
    if name not in b and name not in m:
      raise ValueError(f"loss.delta_stages: unknown stage {name!r}; the stages both the pretrained "
                       f"and the trained model have: {listing}")
    if name not in shared:
      why = "is not in the pretrained model" if name not in b else (
          "was removed by surgery" if name not in m else f"changed its output shape {b[name]} → {m[name]}")
      raise ValueError(f"loss.delta_stages: stage {name!r} {why}; DELTA needs stages both models "
                       f"share: {listing}")
  if not shared:
    raise ValueError("loss.delta: no stage of the model has the pretrained model's name and output "
                     "shape; set loss.delta = 0")
  return tuple(n for n in shared if not wanted or n in wanted)


def _probe_loss(probe: Probe, features: Array, labels: Array) -> Array:
  w, b = probe
  logp = jax.nn.log_softmax(features @ w + b, axis=-1)
  ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  return ce + 0.5 * PROBE_L2 * jnp.sum(jnp.square(w))


@functools.partial(jax.jit, static_argnums=(2,))
def fit_probe(features: Array, labels: Array, num_classes: int) -> Probe:
  """Returns ``(kernel [D, C], bias [C])``, the minimiser of ``mean CE(features @ kernel + bias, labels)
  + PROBE_L2/2 · ‖kernel‖²`` after ``PROBE_STEPS`` L-BFGS steps from zero (deterministic)."""
  features = features.astype(jnp.float32)
  probe = (jnp.zeros((features.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  fn = lambda p: _probe_loss(p, features, labels)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fn)

  def step(carry: Any, _: Any) -> tuple[Any, None]:
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fn)
    return (optax.apply_updates(p, updates), state), None

  (probe, _), _ = jax.lax.scan(step, (probe, opt.init(probe)), None, length=PROBE_STEPS)
  return probe


def _ce(probe: Probe, features: Array, labels: Array) -> Array:
  logp = jax.nn.log_softmax(features.astype(jnp.float32) @ probe[0] + probe[1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _features_from(net: Network, variables: Any, x: Array, stored: dict[str, Array], stage: str,
                   mask: Array) -> Array:
  """Pooled features of ``net`` with ``stage``'s output multiplied by ``mask``: every stage up to it
  returns its ``stored`` output (so it is not recomputed), the later ones run."""

  def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    m = context.module
    if isinstance(m, Stage) and context.method_name == "__call__" and m.name in stored:
      out = stored[m.name]
      return out * mask.astype(out.dtype) if m.name == stage else out
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    return net.apply(variables, x, train=False, return_all=True)["features"]


def loss_increase(net: Network, variables: Any, x: Array, labels: Array, probe: Probe,
                  stages: Sequence[str]) -> dict[str, Array]:
  """``{stage: [C]}``: for each channel of each stage, ``CE(probe) with the channel zeroed - CE(probe)``
  on the batch ``x`` (normalised images; eval mode). Trace it under ``jax.jit``."""
  out = net.apply(variables, x, train=False, return_all=True)
  base = _ce(probe, out["features"], labels)
  order = [st.name for st in net.spec.stages]
  result = {}
  for stage in stages:
    stored = {n: out["stages"][n] for n in order[:order.index(stage) + 1]}
    c = stored[stage].shape[-1]

    def zeroed(j: Array, stage: str = stage, stored: dict = stored, c: int = c) -> Array:
      mask = 1.0 - jax.nn.one_hot(j, c, dtype=jnp.float32)
      return _ce(probe, _features_from(net, variables, x, stored, stage, mask), labels)

    result[stage] = jax.lax.map(zeroed, jnp.arange(c), batch_size=min(c, CHANNEL_CHUNK)) - base
  return result


def attention(increase: dict[str, np.ndarray], temperature: float) -> dict[str, np.ndarray]:
  """``{stage: softmax(increase[stage] / temperature)}`` as new float32 arrays (each sums to 1)."""
  out = {}
  for name, inc in increase.items():
    z = np.asarray(inc, np.float64) / temperature
    e = np.exp(z - z.max())
    out[name] = (e / e.sum()).astype(np.float32)
  return out


def channel_attention(net: Network, variables: Any, batches: Sequence[tuple[Array, Array]],
                      num_classes: int, stages: Sequence[str], temperature: float
                      ) -> tuple[dict[str, np.ndarray], Probe]:
  """DELTA's attention of the pretrained ``net``/``variables`` (not mutated) on ``batches``.

  Args:
    batches: ``(normalised images [N, H, W, 3], labels [N])`` of the target data.
    num_classes: the target task's classes (the probe's outputs).
    stages: the stages to weigh.
    temperature: of the softmax over each stage's channels.

  Returns:
    ``({stage: [C] float32, summing to 1}, probe)``: the per-channel loss increases are averaged over
    the batches before the softmax.
  """
  features = jax.jit(lambda v, x: net.apply(v, x, train=False, return_all=True)["features"])
  f = jnp.concatenate([features(variables, x) for x, _ in batches])
  y = jnp.concatenate([jnp.asarray(l, jnp.int32) for _, l in batches])
  probe = fit_probe(f, y, num_classes)
  increase_fn = jax.jit(lambda v, x, l, p: loss_increase(net, v, x, l, p, tuple(stages)))
  total = None
  for x, l in batches:
    inc = jax.device_get(increase_fn(variables, x, jnp.asarray(l, jnp.int32), probe))
    total = inc if total is None else {k: total[k] + inc[k] for k in inc}
  mean = {k: v / len(batches) for k, v in total.items()}
  logging.info("DELTA attention on %d images: %s", int(y.shape[0]),
               ", ".join(f"{k} max/min {v.max():.3g}/{v.min():.3g}" for k, v in mean.items()))
  return attention(mean, temperature), probe


__all__ = ["attention", "channel_attention", "fit_probe", "loss_increase", "shared_stages",
           "stage_shapes"]
