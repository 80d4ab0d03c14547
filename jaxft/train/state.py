"""The train state: one typed value holding everything a train step reads and returns."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np

from jaxft import optim, paths

Tree = Any


@flax.struct.dataclass
class Ema:
  """The exponential moving average of the trainable params and of the BN statistics."""

  params: Tree
  batch_stats: Tree


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree: jit it, donate it, checkpoint it).

  Attributes:
    step: the number of batches trained on (int32 scalar). The rng of a step is a function of it.
    params: the trainable parameters only (the subtree the optimizer updates).
    frozen: the other parameters (never change; no gradient, no optimizer state).
    batch_stats: BatchNorm running statistics.
    opt_state: the optax state of ``params``.
    ema: the averaged params and statistics, or None when EMA is off.
    reg: the adaptive weights in effect, ``{config key: float32 scalar}`` (``optim.weight_decay``,
      ``loss.kd``, …; empty when none is adaptive): inputs of the train step, moved between steps by
      :mod:`jaxft.train.controller`.
    reg_mode: the controller's memory of each, ``{config key: int32}`` (:data:`jaxft.adapt.UP` …).
  """

  step: Any
  params: Tree
  frozen: Tree
  batch_stats: Tree
  opt_state: Any
  ema: Ema | None = None
  reg: dict[str, Any] = flax.struct.field(default_factory=dict)
  reg_mode: dict[str, Any] = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, trainable: Tree, frozen: Tree, batch_stats: Tree, opt_state: Any,
             ema: bool = False, reg: tuple[dict[str, Any], dict[str, Any]] = ({}, {})) -> "TrainState":
    """Returns the state at step 0; with ``ema`` the average starts as a copy of the weights; ``reg``
    is the adaptive weights' ``(values, modes)`` (:func:`jaxft.adapt.initial`).

    Copies, because the state is donated to the step: no two of its leaves may share a buffer.
    Nothing passed in is mutated.
    """
    average = None
    if ema:
      average = jax.tree.map(lambda a: np.array(a, copy=True),
                             Ema(params=trainable, batch_stats=batch_stats))
    return cls(step=np.int32(0), params=trainable, frozen=frozen, batch_stats=batch_stats,
               opt_state=opt_state, ema=average, reg=dict(reg[0]), reg_mode=dict(reg[1]))

  def variables(self) -> dict[str, Tree]:
    """The network's variables ``{'params': trainable + frozen, 'batch_stats'}`` (a new dict)."""
    return _variables(self.params, self.frozen, self.batch_stats)

  def ema_variables(self) -> dict[str, Tree]:
    """The averaged weights as network variables (frozen leaves as they are); EMA must be on."""
    if self.ema is None:
      raise ValueError("this train state has no EMA (config.ema.decay = 0)")
    return _variables(self.ema.params, self.frozen, self.ema.batch_stats)

  def with_variables(self, variables: Tree, opt_state: Any, *, step: int,
                     ema_variables: Tree | None = None) -> "TrainState":
    """Returns a state holding ``variables`` (split into trainable and frozen as ``self`` is), the
    optimizer state and the EMA (when ``self`` has one); ``self`` is not mutated."""
    params, frozen = self._split(variables["params"])
    ema = None
    if self.ema is not None:
      ema = Ema(params=self._split(ema_variables["params"])[0], batch_stats=ema_variables["batch_stats"])
    return self.replace(step=np.int32(step), params=params, frozen=frozen,
                        batch_stats=variables["batch_stats"], opt_state=opt_state, ema=ema)

  def reg_record(self) -> dict[str, list[float | int]]:
    """The adaptive weights as JSON data, ``{key: [value, mode]}`` (float32 values as exact floats)."""
    values, modes = jax.device_get((self.reg, self.reg_mode))
    return {k: [float(values[k]), int(modes[k])] for k in sorted(values)}

  def with_reg_record(self, record: dict[str, Any]) -> "TrainState":
    """A state holding the adaptive weights of ``record`` (from :meth:`reg_record`); not mutated.

    Raises:
      ValueError: ``record`` names other weights than this state has.
    """
    if sorted(record) != sorted(self.reg):
      raise ValueError(f"adaptive weights saved: {sorted(record) or 'none'}; this config's: "
                       f"{sorted(self.reg) or 'none'}")
    return self.replace(reg={k: np.float32(record[k][0]) for k in self.reg},
                        reg_mode={k: np.int32(record[k][1]) for k in self.reg})

  def _split(self, params: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
    trainable = set(paths.flatten(self.params))
    return optim.partition(params, paths.map_leaves(lambda p, _: p in trainable, params))


def _variables(params: Tree, frozen: Tree, batch_stats: Tree) -> dict[str, Tree]:
  return {"params": optim.merge(params, frozen), "batch_stats": batch_stats}
