""":class:`Model`: the value that flows through jaxft — structure, variables, metadata and history."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.models.network import Network
from jaxft.models.spec import ModelSpec

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
  """An immutable (structure, variables) pair plus what is needed to use and reproduce it.

  Attributes:
    spec: the structure; ``Network(spec)`` is the flax module.
    variables: ``{'params': …, 'batch_stats': …}`` as plain nested dicts of arrays. Never mutated by
      jaxft: every transform returns a new ``Model`` and shares the leaves it does not change.
    meta: plain data — ``arch`` (zoo name of the base model), ``mean``/``std``/``input_size`` for
      preprocessing, ``source`` (file name and sha256 of the converted weights), …
    history: the evolution log, one JSON-serialisable record per surgery op, oldest first; replaying it
      on the base model rebuilds ``spec`` (see ``jaxft.surgery.replay``).
  """

  spec: ModelSpec
  variables: Variables
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  history: tuple[Mapping[str, Any], ...] = ()

  @property
  def params(self) -> dict[str, Any]:
    """The ``params`` collection."""
    return self.variables["params"]

  @property
  def batch_stats(self) -> dict[str, Any]:
    """The ``batch_stats`` collection (empty dict if the model has no BatchNorm)."""
    return self.variables.get("batch_stats", {})

  def module(self, dtype: Any = jnp.float32, frozen_bn: tuple[str, ...] = ()) -> Network:
    """Returns the flax module for this structure."""
    return Network(self.spec, dtype=dtype, frozen_bn=frozen_bn)

  def apply(self, x: jax.Array, **kwargs: Any) -> Any:
    """Eval-mode forward pass on normalised NHWC images (not jitted; for jit use ``module().apply``)."""
    return self.module().apply(self.variables, x, **kwargs)

  def replace(self, **changes: Any) -> "Model":
    """Returns a copy with ``changes`` applied (``dataclasses.replace``); ``self`` is untouched."""
    return dataclasses.replace(self, **changes)


def create(spec: ModelSpec, rng: jax.Array, meta: Mapping[str, Any] | None = None,
           input_size: int = 32) -> Model:
  """Returns a freshly initialised :class:`Model` for ``spec``."""
  model = Network(spec)
  x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x, train=False))(rng)
  return Model(spec=spec, variables={k: dict(v) for k, v in variables.items()}, meta=dict(meta or {}))
